#!/usr/bin/env bash
# The one codegen command (scripts/codegen.py): proto/*.proto -> superweights/v1/ (generated Python: never edited by
# hand, not committed; builds generate it too, see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
"$py" scripts/codegen.py . >/dev/null
