#!/usr/bin/env bash
# The one codegen command: proto/*.proto -> superweights/ (generated Python: never edited by hand, not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
rm -rf superweights
"$py" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(cd proto && find superweights -name '*.proto' | sort)
find superweights -type d -exec touch {}/__init__.py \;
