#!/usr/bin/env bash
# Regenerates the Python stubs next to the .proto files. Run after editing a .proto;
# tests/test_protos.py fails when the committed stubs are stale.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. tuneloop/v1/*.proto
