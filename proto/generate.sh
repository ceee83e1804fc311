#!/usr/bin/env bash
# Regenerate the Python modules and type stubs of the feedloop.v1 contract.
#   proto/generate.sh            write them beside the .proto (they are committed)
#   proto/generate.sh --check    regenerate into a temporary folder and fail if anything differs
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
bin_dir=$(dirname "$(command -v "$python")")
out=$here
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
PATH="$bin_dir:$PATH" "$python" -m grpc_tools.protoc -I"$here" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$here/feedloop/v1/feedloop.proto" 2>&1 | { grep -v "^Writing mypy" || true; }
if [[ "${1:-}" == "--check" ]]; then
  for f in feedloop_pb2.py feedloop_pb2_grpc.py feedloop_pb2.pyi feedloop_pb2_grpc.pyi; do
    if ! diff -q "$out/feedloop/v1/$f" "$here/feedloop/v1/$f" >/dev/null; then
      echo "proto/feedloop/v1/$f is stale: run proto/generate.sh and commit the result" >&2
      exit 1
    fi
  done
  echo "generated proto modules are up to date"
fi
