#!/usr/bin/env bash
# Create a virtual environment and install gemma4_agent into it.
#   scripts/setup.sh          -> .venv       (runtime: torch 2.13.0 CPU)
#   scripts/setup.sh --test   -> .venv-test  (adds the transformers oracle, pytest, hypothesis)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--test" ]]; then venv=.venv-test; req=requirements-test.txt; else venv=.venv; req=requirements.txt; fi
python3 -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ needed"'
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip==24.3.1
"$venv/bin/python" -m pip install -q -r "$req"
"$venv/bin/python" -m pip install -q --no-deps -e .
echo "$venv ready"
