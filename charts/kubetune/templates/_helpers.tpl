{{/*
Names and labels are those of manifests/ (no Helm-specific labels), so the chart and kustomize
render identical objects and one can replace the other.
*/}}

{{/* The operator's namespace: namespace.name, else the release's. */}}
{{- define "kubetune.namespace" -}}
{{- .Values.namespace.name | default .Release.Namespace -}}
{{- end -}}

{{/* What the Deployment selects and its pods carry. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune-operator
app.kubernetes.io/component: operator
{{- end -}}

{{/* Every operator object: its selector labels plus what manifests/kustomization.yaml adds. */}}
{{- define "kubetune.labels" -}}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{/* The monitoring objects of manifests/monitoring. */}}
{{- define "kubetune.monitoringLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/component: monitoring
app.kubernetes.io/part-of: kubetune
{{- end -}}
