#!/usr/bin/env bash
# Set up the test environment and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export AMENT_PREFIX_PATH="$PWD/.venv-test${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
set +e
.venv-test/bin/python -m pytest -q -p no:cacheprovider test "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure of the suite, say so plainly.
if [[ $rc -eq 5 ]]; then echo "no tests were collected"; exit 1; fi
exit $rc
