#!/usr/bin/env bash
# The quality benchmark (README "Quality benchmark"): Her2ST with the stain encoder, HINGE against the
# baselines, Gauss-Diff and a scratch backbone, on the same folds and metrics, in two tables:
#   within patient C: leave-one-slice-out over C2-C6 (the other four C slices train);
#   across patients:  train on C2-C6, test on B4 (patient B), HINGE over three training seeds.
#
#   bash bench/quality.sh                    # every fold (about 80 minutes on 2 CPU cores)
#   bash bench/quality.sh --folds C2         # the quick version (one within-patient fold)
#
# Every hyper-parameter is chosen on the fold's validation spots (10 % of the training spots)
# or fixed in advance; each test slice is generated once per method (and seed) and only scored.
# Re-running continues: finished predictions are kept. Ends with the two tables (mean ± std over
# folds, or over seeds) and the wall time per method.
set -euo pipefail
cd "$(dirname "$0")/.."

RAW=../shared/data/her2st OUT=runs/quality FOLDS="" SEEDS=42,1,2 EPOCHS=10 LR=1e-3 PRE_EPOCHS=2 SAMPLES=10 DATA_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --raw) RAW="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --folds) FOLDS="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --lr) LR="$2"; shift 2 ;;
    --pretrain-epochs) PRE_EPOCHS="$2"; shift 2 ;;
    --samples) SAMPLES="$2"; shift 2 ;;
    --data-only) DATA_ONLY=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"
               echo "options: --raw DIR --out DIR --folds C2,B4 --seeds 42,1,2 (cross-patient HINGE) --epochs N --lr LR"
               echo "         --pretrain-epochs N --samples S (HINGE and scratch; Gauss-Diff at K = 50 draws 2) --data-only"
               exit 0 ;;
    *) echo "error: unknown option $1 (see bash bench/quality.sh --help)" >&2; exit 2 ;;
  esac
done
bash run_all.sh --install-only
PY=.venv/bin/python DATA=$OUT/data TIMES=$OUT/times.tsv
mkdir -p "$OUT"; touch "$TIMES"

timed() {  # timed LABEL FOLD cmd...: run cmd, append "LABEL FOLD seconds" to times.tsv
  local label=$1 fold=$2 t0=$EPOCHREALTIME; shift 2
  "$@"
  awk -v l="$label" -v f="$fold" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%s\t%s\t%.1f\n", l, f, b - a}' >> "$TIMES"
}

echo "== data: Her2ST from $RAW, stain features"
# every slice with an image is a test slice of some fold: genes are selected on the others only
IMAGED=$(find "$RAW/ST-imgs" -mindepth 3 -maxdepth 3 -type f \( -iname '*.jp*g' -o -iname '*.png' -o -iname '*.tif*' \) \
         -exec dirname {} \; | xargs -n1 basename | sort -u | paste -sd,)
$PY prepare_data.py --dataset her2st --raw "$RAW" --out "$DATA" --test-slices "$IMAGED"
$PY extract_features.py --data "$DATA" --encoder stain
WITHIN=$(awk -F'\t' 'NR > 1 && $4 == 1 && $2 == "C" {print $1}' "$DATA/slices.tsv" | paste -sd,)
OTHERS=$(awk -F'\t' 'NR > 1 && $4 == 1 && $2 != "C" {print $1}' "$DATA/slices.tsv" | paste -sd,)  # B4
FOLDS=${FOLDS:-$WITHIN,$OTHERS}  # every fold trains on patient C's imaged slices other than its test slice

BACKBONE=$OUT/backbone.safetensors  # pre-trained once on the 30 slices without images: no fold's test slice is in it
[ -f "$BACKBONE" ] || timed pretrain all $PY pretrain.py --data "$DATA" --exclude "$IMAGED" --preset small \
                                         --epochs "$PRE_EPOCHS" --lr 3e-3 --out "$BACKBONE"
[ "$DATA_ONLY" = 1 ] && exit 0  # data, features and backbone only (bench/choose_gate.sh)

table_of() { [[ ",$WITHIN," == *",$1,"* ]] && echo within || echo cross; }

train() {  # train NAME FOLD args...: one train.py run, skipped when finished
  local name=$1 s=$2; shift 2
  [ -f "$OUT/runs/$s/$name/done" ] && return
  rm -rf "$OUT/runs/$s/$name"
  timed "train:${name%@*}" "$s" $PY train.py --data "$DATA" --features stain --test-slice "$s" --exclude "$OTHERS" \
      --preset small --epochs "$EPOCHS" --lr "$LR" --out "$OUT/runs/$s/$name" "$@"
  touch "$OUT/runs/$s/$name/done"
}

sample() {  # sample METHOD RUN FOLD K S
  local dir=$OUT/pred/$(table_of "$3")/$1
  [ -f "$dir/$3.h5" ] && return
  timed "${1%@*}" "$3" $PY sample.py --run "$OUT/runs/$3/$2" --data "$DATA" --steps "$4" --samples "$5" \
      --save-samples --out "$dir" --overwrite
}

IFS=, read -ra folds <<< "$FOLDS"
for s in "${folds[@]}"; do
  echo "== fold $s ($(table_of "$s") patient)"
  for m in mean ridge mlp knn; do
    dir=$OUT/pred/$(table_of "$s")/$m
    [ -f "$dir/$s.h5" ] || timed "$m" "$s" $PY baselines.py --data "$DATA" --features stain --test-slice "$s" \
                              --exclude "$OTHERS" --method "$m" --save-samples --out "$dir"
  done
  seeds=42; [ "$(table_of "$s")" = cross ] && seeds=$SEEDS
  IFS=, read -ra seed_list <<< "$seeds"
  for seed in "${seed_list[@]}"; do
    tag=$([ "$seed" = 42 ] || echo "@$seed")  # seed 42 (the default) is the plain name
    train "hinge$tag" "$s" --cellfm-ckpt "$BACKBONE" --seed "$seed"
    for K in 1 5; do sample "hinge_K$K$tag" "hinge$tag" "$s" "$K" "$SAMPLES"; done
  done
  train gaussian "$s" --cellfm-ckpt "$BACKBONE" --objective gaussian
  sample gaussian_K50 gaussian "$s" 50 2                   # DDIM at the full budget: Gauss-Diff's best case
  train scratch "$s" --variant scratch
  sample scratch_K5 scratch "$s" 5 "$SAMPLES"
done

echo "== evaluate"
METHODS="mean ridge mlp knn gaussian_K50 scratch_K5 hinge_K1 hinge_K5 hinge_K50"
for m in $METHODS; do
  $PY evaluate.py --pred "$OUT/pred/$m" --data "$DATA" --out "$OUT/eval/$m" --label "$m" > "$OUT/eval_$m.log"
done
$PY - "$OUT" "$FOLDS" $METHODS <<'EOF'
import json, sys
import pandas as pd
out, folds, methods = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
times = pd.read_csv(f"{out}/times.tsv", sep="\t", names=["label", "fold", "s"])
times = times[times.fold.isin(folds + ["all"])]
train_of = {"gaussian_K50": "train:gaussian", "scratch_K5": "train:scratch", "hinge_K1": "train:hinge",
            "hinge_K5": "train:hinge", "hinge_K50": "train:hinge"}
cols = ["PCC-50", "PCC-200", "mean_r", "MSE", "MAE", "SSIM"]
print(f"\nHer2ST, stain features, leave-one-slice-out over {', '.join(folds)}"
      + (" (mean ± std over folds)" if len(folds) > 1 else ""))
print(f"{'method':<14}" + "".join(f"{c:>14}" for c in cols) + f"{'fit s/fold':>12}{'predict s/fold':>16}")


def cell(m):  # one fold has no spread to show; undefined (constant predictor) shows as a dash
    return "–" if m["mean"] != m["mean"] else f"{m['mean']:.3f}" + (f"±{m['std']:.3f}" if len(folds) > 1 else "")


for m in methods:
    s = json.load(open(f"{out}/eval/{m}/summary.json"))["metrics"]
    fit = f"{times[times.label == train_of[m]].s.mean():.0f}" if m in train_of else "–"  # baselines: one process
    pred = times[times.label == m].s.mean()
    print(f"{m:<14}" + "".join(cell(s[c]).rjust(14) for c in cols) + f"{fit:>12}{pred:>16.1f}")
pre = times[times.label == "pretrain"].s
if len(pre):
    print(f"(hinge_* and gaussian_K50 also share one pretrain.py backbone: {pre.iloc[0]:.0f} s once, for all folds)")
print("(mean predicts one value per gene: its per-gene r is undefined, so its PCC columns are empty)")
EOF
