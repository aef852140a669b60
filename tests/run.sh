#!/usr/bin/env bash
# The README's test command: set up .venv from requirements.txt (as run_all.sh does), then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help)
    cat <<'HELP'
usage: bash tests/run.sh [--fast] [pytest arguments]

  (no option)  the whole suite, as CI runs it (about 20 minutes on 2 cores)
  --fast       only the tests that start no script and need none of the pipeline fixtures (marker `slow`
               unset; about 3 minutes on 2 cores): the loop to run while editing
  e.g.         bash tests/run.sh tests/test_model.py -k sampler
HELP
    exit 0 ;;
  --fast) shift; set -- -m "not slow" "$@" ;;
esac
bash run_all.sh --install-only
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
