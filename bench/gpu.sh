#!/usr/bin/env bash
# The one-GPU check, under 8 minutes on one GPU; CI never runs it. It prints one table:
#   - sampler spots/s at K = 5, S = 1 (bf16, batch 256) of the cellfm-800m and scgpt presets, random weights
#     (a preset model.py does not have is skipped with a note);
#   - UNI and CONCH patches/s (extract_features.py's encoders, random weights, bf16, batch 256);
#   - sample.py (`small`, K = 5, S = 1, bf16, batch 1024) over a whole slide of 600,536 bins, the size of
#     bench/wsi_bench.py's Visium HD slide of 8 µm bins, to AnnData: wall s, bins/s and peak host memory;
#   - whether `torchrun --nproc_per_node 1 sample.py` writes the same pred array as a plain one-process run;
#   - peak GPU memory of each in-process measurement (torch.cuda.max_memory_allocated).
# Its synthetic data (slices of 2,048 and 600,536 spots, 1536-d features, random `small` checkpoints; about 8 GB
# with the outputs) lives in a temporary folder removed on exit; nothing is downloaded.
#
#   bash bench/gpu.sh               # on a machine with one GPU
#   bash bench/gpu.sh --cpu-smoke   # every piece on the CPU at tiny sizes (under a minute): checks the script
# PYTHON=/path/to/python overrides the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" bench/gpu_bench.py --work "$work" "$@"
