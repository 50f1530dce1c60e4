#!/usr/bin/env bash
# Set up the runtime environment and run the main job on the embedded default:
# the node with the bundled demo engine, the sample bag played into it over ROS 2, evaluation printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export AMENT_PREFIX_PATH="$PWD/.venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
exec .venv/bin/gemma4-agent demo "$@"
