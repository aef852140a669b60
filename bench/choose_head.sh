#!/usr/bin/env bash
# How train.py's default head and sample.py's default temperature were chosen (docs/results.md
# "Choosing the head"): HINGE trained with each head (--head point|gaussian|bins) with the Her2ST quality
# benchmark's settings on its within-patient folds, generated at K = 5 with S = 10 samples on each fold's
# validation spots only (10 % of its training spots, seed 42), at temperatures 0.5 and 1 for the
# distributional heads, and scored by PCC-50, MSE and the cross-fitted calibrated CRPS (bench/validate.py).
# The rule, fixed before any number: the lowest mean validation CRPS among the settings whose PCC-50 and
# MSE are no worse than the point head's by more than one fold-to-fold std.
#
#   bash bench/choose_head.sh                     # five folds C2-C6
#   bash bench/choose_head.sh --folds C2,C3,C4    # fewer folds
# The runs go where bench/quality.sh looks for them (runs/quality/runs/<fold>/hinge_<head>), so the
# quality benchmark predicts its test slices with these very runs.
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDS=C2,C3,C4,C5,C6
[ "${1:-}" = --folds ] && FOLDS=$2
bash bench/quality.sh --data-only                  # Her2ST data, stain features and the shared backbone
PY=.venv/bin/python Q=runs/quality OUT=runs/choose_head
mkdir -p "$OUT"; rm -f "$OUT/validation.csv"
IFS=, read -ra folds <<< "$FOLDS"
for s in "${folds[@]}"; do
  runs=()
  for head in point gaussian bins; do
    dir=$Q/runs/$s/hinge_$head
    if [ ! -f "$dir/done" ]; then
      rm -rf "$dir"
      $PY train.py --data $Q/data --features stain --test-slice "$s" --exclude B4 --preset small --epochs 10 --lr 1e-3 \
          --backbone-ckpt $Q/backbone.safetensors --head $head --out "$dir"
      touch "$dir/done"
    fi
    runs+=("$dir")
  done
  echo "== validation spots of Her2ST fold $s"
  $PY bench/validate.py --data $Q/data --runs "${runs[@]}" --steps 5 --samples 10 --temperatures 0.5,1 \
      --csv "$OUT/validation.csv"
done
$PY - "$OUT/validation.csv" <<'PY'
import sys
import pandas as pd
df = pd.read_csv(sys.argv[1])
df["fold"] = df.run.str.split("/").str[-2]
by = df.groupby(["head", "temperature"])
table = by[["PCC-50", "MSE", "CRPS", "cover90", "mean_r", "bias2"]].agg(["mean", "std"])
point = table.loc[("point", 0.0)]
ok = (table[("PCC-50", "mean")] >= point[("PCC-50", "mean")] - point[("PCC-50", "std")]) & \
     (table[("MSE", "mean")] <= point[("MSE", "mean")] + point[("MSE", "std")])
print(f"\nvalidation spots, K = 5, S = 10, mean ± std over {df.fold.nunique()} folds (CRPS, cover90: calibrated, cross-fitted)")
print("| head | temperature | PCC-50 | MSE | bias2 | CRPS | cover90 | eligible |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
for (head, tau), r in table.iterrows():
    cell = lambda k: f"{r[(k, 'mean')]:.3f}±{r[(k, 'std')]:.3f}"
    print(f"| {head} | {tau:g} | {cell('PCC-50')} | {cell('MSE')} | {cell('bias2')} | {cell('CRPS')} | {cell('cover90')} | "
          f"{'yes' if ok[(head, tau)] else 'no'} |")
best = table[ok][("CRPS", "mean")].idxmin()
print(f"chosen: --head {best[0]} --temperature {best[1]:g} (lowest validation CRPS among the eligible)")
PY
