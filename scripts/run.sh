#!/usr/bin/env bash
# The main job on embedded defaults: installs what it needs, then runs the node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sonocase serve "$@"
