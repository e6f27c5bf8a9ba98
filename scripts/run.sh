#!/usr/bin/env bash
# The main job: installs what it needs, then runs the self-contained demo (a node
# on embedded defaults, a stand-in PACS, synthetic studies pushed by C-STORE, the
# results printed). Options go to `sonocase demo` (see --help); the real node is
# `.venv/bin/sonocase serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sonocase demo "$@"
