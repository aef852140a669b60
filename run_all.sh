#!/usr/bin/env bash
# HINGE end to end: set up .venv, then prepare -> features -> (pretrain) -> train -> sample -> evaluate,
# leave-one-slice-out over a test pool. `bash run_all.sh --help` lists the options.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'HELP'
usage: bash run_all.sh [options]

  --dataset NAME      demo (default, synthetic, offline), her2st, visium or hest
  --raw DIR           raw data folder (her2st, visium, hest)
  --out DIR           output folder (default runs/<dataset>)
  --vocab CSV         CellFM gene_info.csv: keep vocabulary genes and store their token ids
  --install-only      only create or update .venv from requirements.txt
  -h, --help          this help
HELP
}

DATASET=demo RAW="" OUT="" VOCAB="" INSTALL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) DATASET="$2"; shift 2 ;;
    --raw) RAW="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --vocab) VOCAB="$2"; shift 2 ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see bash run_all.sh --help)" >&2; exit 2 ;;
  esac
done

# --- environment: .venv from requirements.txt, rebuilt only when requirements.txt changes ---
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (first run: about two minutes)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi
[ "$INSTALL_ONLY" = 1 ] && exit 0
PY=.venv/bin/python

OUT=${OUT:-runs/$DATASET}
DATA=$OUT/data
prep=(--dataset "$DATASET" --out "$DATA")
[ -n "$RAW" ] && prep+=(--raw "$RAW")
[ -n "$VOCAB" ] && prep+=(--vocab "$VOCAB")
$PY prepare_data.py "${prep[@]}"
