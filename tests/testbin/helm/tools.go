//go:build tools

// Package testbin pins the command this module builds, so `go mod tidy` keeps its dependencies.
package testbin

import _ "helm.sh/helm/v4/cmd/helm"
