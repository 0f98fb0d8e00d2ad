#!/usr/bin/env bash
# The one codegen command: proto/*.proto -> superweights/v1/ (generated Python: never edited by hand, not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
rm -rf superweights/v1
"$py" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(cd proto && find superweights -name '*.proto' | sort)
find superweights/v1 -type d -exec touch {}/__init__.py \;
