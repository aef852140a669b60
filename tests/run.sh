#!/usr/bin/env bash
# The README's test command: set up .venv from requirements.txt (as run_all.sh does), then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash run_all.sh --install-only
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
