#!/usr/bin/env bash
# The quality benchmark (README "Quality benchmark"): Her2ST with the stain encoder, HINGE against the
# baselines, Gauss-Diff and a scratch backbone, on the same folds and metrics, in two tables:
#   within patient C: leave-one-slice-out over C2-C6 (the other four C slices train);
#   across patients:  train on C2-C6, test on B4 (patient B), HINGE (the default head) over three training seeds,
#                     and HINGE on an scGPT backbone of the same size (the paper's fast variant), pre-trained alike.
#
#   bash bench/quality.sh                    # every fold (about 75 minutes on 2 CPU cores)
#   bash bench/quality.sh --folds C2         # the quick version: one within-patient fold, about 16 minutes
#   bash bench/quality.sh --no-ablations     # without the rows of the gaussian head, K = 1, Gauss-Diff and scratch
#
# Every hyper-parameter is chosen on the fold's validation spots (10 % of the training spots)
# or fixed in advance; each test slice is generated once per method (and seed) and only scored.
# Re-running continues: finished predictions are kept. Ends with the two tables (mean ± std over
# folds, or over seeds) and the wall time per method.
set -euo pipefail
cd "$(dirname "$0")/.."

RAW=../shared/data/her2st OUT=runs/quality FOLDS="" SEEDS=42,1,2 EPOCHS=10 LR=1e-3 PRE_EPOCHS=2 SAMPLES=10 DATA_ONLY=0 ABLATIONS=1
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
    --no-ablations) ABLATIONS=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"
               echo "options: --raw DIR --out DIR --folds C2,B4 --seeds 42,1,2 (cross-patient HINGE) --epochs N --lr LR"
               echo "         --pretrain-epochs N --samples S (HINGE and scratch; Gauss-Diff at K = 50 draws 2) --data-only --no-ablations"
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
if [ ! -f "$DATA/features/stain/done" ]; then  # prepared once: a second run (another folds' stream) reads it as is
  $PY prepare_data.py --dataset her2st --raw "$RAW" --out "$DATA" --test-slices "$IMAGED"
  $PY extract_features.py --data "$DATA" --encoder stain
  touch "$DATA/features/stain/done"
fi
WITHIN=$(awk -F'\t' 'NR > 1 && $4 == 1 && $2 == "C" {print $1}' "$DATA/slices.tsv" | paste -sd,)
OTHERS=$(awk -F'\t' 'NR > 1 && $4 == 1 && $2 != "C" {print $1}' "$DATA/slices.tsv" | paste -sd,)  # B4
FOLDS=${FOLDS:-$WITHIN,$OTHERS}  # every fold trains on patient C's imaged slices other than its test slice

pretrain() {  # pretrain LABEL PRESET OUT: once, on the 30 slices without images (no fold's test slice is in it)
  [ -e "$3" ] || timed "$1" all $PY pretrain.py --data "$DATA" --exclude "$IMAGED" --preset "$2" \
                                  --epochs "$PRE_EPOCHS" --lr 3e-3 --out "$3"   # written whole, then renamed
}
BACKBONE=$OUT/backbone.safetensors
pretrain pretrain small "$BACKBONE"
SCGPT=$OUT/backbone_scgpt          # the scGPT row's, pre-trained alike: a checkpoint folder in scGPT's layout
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
  for m in mean ridge mlp knn stflow triplex merge ridge_ctx8 mlp_ctx8; do  # the peers: the 120 s CPU budget of baselines.py
    dir=$OUT/pred/$(table_of "$s")/$m extra=()
    case $m in knn|stflow) extra=(--save-samples) ;; *_ctx8) extra=(--context 8) ;; esac  # samples: neighbours, draws
    [ -f "$dir/$s.h5" ] || timed "$m" "$s" $PY baselines.py --data "$DATA" --features stain --test-slice "$s" \
                              --exclude "$OTHERS" --method "${m%_ctx8}" "${extra[@]}" --out "$dir"
  done
  seeds=42; [ "$(table_of "$s")" = cross ] && seeds=$SEEDS
  IFS=, read -ra seed_list <<< "$seeds"
  for seed in "${seed_list[@]}"; do
    tag=$([ "$seed" = 42 ] || echo "@$seed")  # seed 42 (the default) is the plain name
    for head in gaussian point; do           # HINGE as it ships (gaussian, temperature 0.5) and the official head
      train "hinge_$head$tag" "$s" --backbone-ckpt "$BACKBONE" --seed "$seed" --head $head
      sample "hinge_${head}_K5$tag" "hinge_$head$tag" "$s" 5 "$SAMPLES"
    done
  done
  train hinge_ctx8 "$s" --backbone-ckpt "$BACKBONE" --context 8
  sample hinge_ctx8_K5 hinge_ctx8 "$s" 5 "$SAMPLES"
  if [ "$(table_of "$s")" = cross ]; then   # the paper's fast variant: an scGPT backbone of the same size, pre-trained alike
    pretrain pretrain:scgpt scgpt-small "$SCGPT"
    train hinge_scgpt "$s" --preset scgpt-small --backbone-ckpt "$SCGPT"
    sample hinge_scgpt_K5 hinge_scgpt "$s" 5 "$SAMPLES"
  fi
  [ "$ABLATIONS" = 1 ] || continue          # the other head, the step budget and the paper's ablations
  train hinge_bins "$s" --backbone-ckpt "$BACKBONE" --head bins  # bench/choose_head.sh trains the heads too
  sample hinge_bins_K5 hinge_bins "$s" 5 "$SAMPLES"
  sample hinge_gaussian_K1 hinge_gaussian "$s" 1 "$SAMPLES"
  train gaussian "$s" --backbone-ckpt "$BACKBONE" --objective gaussian
  sample gaussian_K50 gaussian "$s" 50 2                   # DDIM at the full budget: Gauss-Diff's best case
  train scratch "$s" --variant scratch
  sample scratch_K5 scratch "$s" 5 "$SAMPLES"
done

echo "== evaluate"
for d in "$OUT"/pred/*/*/; do  # pred/<within|cross>/<method[@seed]>/
  t=$(basename "$(dirname "$d")") m=$(basename "$d")
  mkdir -p "$OUT/eval/$t"
  $PY evaluate.py --pred "$d" --data "$DATA" --out "$OUT/eval/$t/$m" --label "$m" > "$OUT/eval/$t/$m.log"
done
$PY - "$OUT" "$FOLDS" <<'EOF'
import glob, json, os, sys
import numpy as np
import pandas as pd
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, folds = sys.argv[1], sys.argv[2].split(",")
times = pd.read_csv(f"{out}/times.tsv", sep="\t", names=["label", "fold", "s"])
names = {"mean": "training mean", "ridge": "ridge", "mlp": "MLP head", "knn": "kNN", "gaussian_K50": "Gauss-Diff K=50",
         "scratch_K5": "scratch K=5", "hinge_gaussian_K1": "HINGE K=1", "hinge_gaussian_K5": "HINGE K=5",
         "hinge_point_K5": "HINGE point K=5", "hinge_bins_K5": "HINGE bins K=5", "stflow": "STFlow",
         "triplex": "TRIPLEX", "merge": "MERGE", "ridge_ctx8": "ridge --context 8", "mlp_ctx8": "MLP --context 8",
         "hinge_ctx8_K5": "HINGE --context 8 K=5", "hinge_scgpt_K5": "HINGE scGPT-small K=5"}
fit_of = {"gaussian_K50": "train:gaussian", "scratch_K5": "train:scratch", "hinge_gaussian_K1": "train:hinge_gaussian",
          "hinge_bins_K5": "train:hinge_bins", "hinge_point_K5": "train:hinge_point",
          "hinge_gaussian_K5": "train:hinge_gaussian", "hinge_ctx8_K5": "train:hinge_ctx8",
          "hinge_scgpt_K5": "train:hinge_scgpt"}
cols = ["PCC-50", "mean_r", "MSE", "bias2", "SSIM", "CRPS", "cover50", "cover90", "spread_skill", "struct_r",
        "struct_r_sample", "struct_r_partial"]
titles = {"within": "within patient C: leave-one-slice-out, mean ± std over folds",
          "cross": "across patients: train C2-C6, test B4, mean ± std over HINGE's training seeds"}


def cell(v):
    v = v.dropna()
    if not len(v):
        return "–"
    return f"{v.mean():.3f}" + (f"±{v.std():.3f}" if len(v) > 1 else "")


for t in ("within", "cross"):
    rows, curves = [], {}
    for m in names:
        dirs = [d for d in sorted(glob.glob(f"{out}/eval/{t}/{m}") + glob.glob(f"{out}/eval/{t}/{m}@*"))
                if os.path.isfile(f"{d}/metrics.csv")]
        if not dirs:
            continue
        df = pd.concat([pd.read_csv(f"{d}/metrics.csv") for d in dirs])
        df = df[df.slice.isin(folds)]
        if not len(df):                                  # predicted only for folds not asked for
            continue
        tm = times[times.fold.isin(df.slice)]
        fit = tm[tm.label == fit_of[m]].s.mean() if m in fit_of else float("nan")
        rows.append([names[m]] + [cell(df[c]) if c in df else "–" for c in cols]
                    + ["–" if fit != fit else f"{fit:.0f}", f"{tm[tm.label == m].s.mean():.1f}"])
        cal = [json.load(open(f"{d}/summary.json")).get("calibration") for d in dirs]
        if cal[0]:
            curves[names[m]] = (cal[0]["levels"], np.mean([c["coverage"] for c in cal], 0),
                                np.mean([c.get("raw_coverage", c["coverage"]) for c in cal], 0))
    if not rows:
        continue
    print(f"\nHer2ST, stain features, {titles[t]}")
    head = ["method"] + cols + ["fit s", "predict s"]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.8))
    for ax, k, what in ((axes[0], 2, "raw spread (--no-calibrate)"), (axes[1], 1, "calibrated on validation spots")):
        ax.plot([0, 1], [0, 1], ":", color="0.5")
        for label, c in curves.items():
            ax.plot(c[0], c[k], "o-", ms=3, label=label)
        ax.set_xlabel("nominal level of the central interval"); ax.set_ylabel("observed coverage of truth")
        ax.set_xlim(0, 1); ax.set_ylim(0, 1); ax.set_aspect("equal")
        ax.set_title(f"{what}, {t} patient", fontsize=9)
    axes[0].legend(fontsize=6, loc="upper left")
    fig.tight_layout(); fig.savefig(f"{out}/calibration_{t}.png", dpi=120); plt.close(fig)
    print(f"(calibration curves: {out}/calibration_{t}.png)")
pre = times[times.label == "pretrain"].s
if len(pre):
    print(f"(HINGE and Gauss-Diff share one pretrain.py backbone: {pre.iloc[0]:.0f} s once, for all folds)")
pre = times[times.label == "pretrain:scgpt"].s
if len(pre):
    print(f"(the scGPT-small backbone of HINGE scGPT-small: pretrain.py, {pre.iloc[0]:.0f} s once)")
print("(the training mean is one value per gene: its r and structure are undefined; ridge's and the MLP's std is one "
      "value per gene, so their spread_skill is undefined; Gauss-Diff at K = 50 draws S = 2 samples, the others 10)")
EOF
