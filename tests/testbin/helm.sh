#!/usr/bin/env bash
# Builds helm from its Go module (tests/testbin/helm/go.mod pins the release) for the chart's lint
# and template tests, and caches it outside the clone like tests/testbin/build.sh does the cluster
# binaries: $KUBETUNE_TESTBIN_CACHE (default ~/.cache/kubetune/testbin)/helm-<version>-<hash>/helm,
# where the hash covers this script, go.mod and go.sum, linked as current/helm. Only the first run
# on a machine builds; a cached run only hashes three files.
#
# Usage: tests/testbin/helm.sh [--print-path]
#   --print-path  print where the binary is (or will be) linked, build nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KUBETUNE_TESTBIN_CACHE:-$HOME/.cache/kubetune/testbin}"
module=helm.sh/helm/v4
# go.sum is committed; the checksum database is not reachable from every build machine, and the
# committed sums are what verifies each download.
export GOSUMDB=off GOFLAGS=-mod=readonly GOTOOLCHAIN=local CGO_ENABLED=0

if [[ "${1:-}" == "--print-path" ]]; then
  echo "$cache/current/helm"
  exit 0
fi

version="$(awk -v m="$module" '$1 == "require" && $2 == m { print $3 }' "$here/helm/go.mod")"
hash="$(cat "$here/helm/go.mod" "$here/helm/go.sum" "$here/helm.sh" | sha256sum | cut -c1-12)"
out="$cache/helm-$version-$hash"

if [[ -f "$out/.complete" ]]; then
  echo "testbin: helm $version cached in $out"
else
  echo "testbin: building helm ($module $version) into $out"
  start=$SECONDS
  mkdir -p "$cache"
  # A directory of its own, so two builds at once never write into each other's output.
  partial="$(mktemp -d "$out.partial.XXXXXX")"
  chmod 755 "$partial"
  trap 'rm -rf "$partial"' EXIT
  # What helm's Makefile stamps in for a tagged release; `helm version` reports it.
  ldflags="-s -w -X $module/internal/version.version=$version -X $module/internal/version.metadata="
  ldflags+=" -X $module/internal/version.gitTreeState=clean"
  if ! (cd "$here/helm" && go build -trimpath -ldflags "$ldflags" -o "$partial/helm" "$module/cmd/helm"); then
    echo "testbin: FAILED to build helm from $module $version (tests/testbin/helm)" >&2
    exit 1
  fi
  touch "$partial/.complete"
  rm -rf "$out"
  mv "$partial" "$out"
  echo "testbin: built helm $version in $((SECONDS - start)) s"
fi
mkdir -p "$cache/current"
ln -sfn "$out/helm" "$cache/current/helm"
