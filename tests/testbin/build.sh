#!/usr/bin/env bash
# Builds the real-cluster tier's binaries from source through the Go module proxy and caches them
# outside the clone, keyed by component, version and a hash of its go.mod/go.sum, so only the
# first run on a machine pays for the build:
#
#   kube-apiserver kube-controller-manager kube-scheduler kubectl   (tests/testbin/kubernetes)
#   etcd                                                            (tests/testbin/etcd)
#   minio                                                           (tests/testbin/minio)
#
# Usage: tests/testbin/build.sh [--print-dir]
#   --print-dir  print the directory that holds (or will hold) every binary, build nothing.
# The binaries land in $KUBETUNE_TESTBIN_CACHE (default ~/.cache/kubetune/testbin)/<key>/ and are
# linked into $KUBETUNE_TESTBIN_CACHE/current/, which tests/cluster reads.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${KUBETUNE_TESTBIN_CACHE:-$HOME/.cache/kubetune/testbin}"
# go.sum is committed; the checksum database is not reachable from every build machine, and the
# committed sums are what verifies each download.
export GOSUMDB=off GOFLAGS=-mod=readonly GOTOOLCHAIN=local CGO_ENABLED=0

# component directory, module whose version names the cache entry, packages to build
components=(
  "kubernetes k8s.io/kubernetes k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl"
  "etcd go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3"
  "minio github.com/minio/minio github.com/minio/minio"
)

module_version() { # dir module -> the version go.mod requires
  awk -v m="$2" '$1 == "require" && $2 == m { print $3 } $1 == m && NF == 2 { print $2 }' "$here/$1/go.mod" | head -n1
}

cache_key() { # dir module -> name-version-hash
  local version hash
  version="$(module_version "$1" "$2")"
  hash="$(cat "$here/$1/go.mod" "$here/$1/go.sum" "$0" | sha256sum | cut -c1-12)"
  echo "$1-$version-$hash"
}

binary_name() { # package -> the file name of its binary
  case "$1" in
    go.etcd.io/etcd/server/v3) echo etcd ;;
    *) basename "$1" ;;
  esac
}

if [[ "${1:-}" == "--print-dir" ]]; then
  echo "$cache/current"
  exit 0
fi

mkdir -p "$cache/current"
for entry in "${components[@]}"; do
  read -r dir module packages <<<"$entry"
  key="$(cache_key "$dir" "$module")"
  version="$(module_version "$dir" "$module")"
  out="$cache/$key"
  if [[ -f "$out/.complete" ]]; then
    echo "testbin: $dir $version cached in $out"
  else
    echo "testbin: building $dir ($module $version) into $out"
    start=$SECONDS
    rm -rf "$out.partial"
    mkdir -p "$out.partial"
    ldflags="-s -w"
    if [[ "$dir" == kubernetes ]]; then
      # What `make` in the Kubernetes repository stamps in; kubectl and the version skew checks read it.
      minor="$(echo "$version" | cut -d. -f2)"
      for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
      done
    fi
    for pkg in $packages; do
      name="$(binary_name "$pkg")"
      if ! (cd "$here/$dir" && go build -trimpath -ldflags "$ldflags" -o "$out.partial/$name" "$pkg"); then
        echo "testbin: FAILED to build $pkg from $module $version (tests/testbin/$dir)" >&2
        exit 1
      fi
    done
    touch "$out.partial/.complete"
    rm -rf "$out"
    mv "$out.partial" "$out"
    echo "testbin: built $dir $version in $((SECONDS - start)) s"
  fi
  for binary in "$out"/*; do
    ln -sfn "$binary" "$cache/current/$(basename "$binary")"
  done
done
