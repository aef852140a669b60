#!/usr/bin/env bash
# The quality benchmark (README "Quality benchmark"): Her2ST with the stain encoder, HINGE against the
# baselines, Gauss-Diff and a scratch backbone, on the same folds and metrics, in two tables:
#   within patient C: leave-one-slice-out over C2-C6 (the other four C slices train);
#   across patients:  train on C2-C6, test B4 (patient B), every trained row over three training seeds,
#                     and HINGE on an scGPT backbone of the same size (the paper's fast variant), pre-trained alike.
#
#   bash bench/quality.sh --jobs 2           # every fold, two processes at a time (2 cores: see docs/results.md)
#   bash bench/quality.sh --folds C2         # the quick version: one within-patient fold
#   bash bench/quality.sh --no-ablations     # without the rows of the bins head, K = 1, Gauss-Diff and scratch
#   bash bench/quality.sh --dry-run          # what is done and what is left, running nothing
#
# Every hyper-parameter is chosen on the fold's validation spots (10 % of the training spots) or fixed in
# advance, every budget in epochs (none in seconds); each test slice is generated once per method and seed
# and only scored. Each process runs --threads torch threads (default 1) whatever --jobs is, so the numbers
# are the same bit for bit for any --jobs and any load. Re-running resumes row by row: finished
# predictions are kept, metrics newer than their predictions are not recomputed; two runs at once share
# the work (each row is locked while it runs). Ends with the two tables (mean ± std over folds, or over
# seeds), each method's difference to the HINGE default with its 95 % interval, and the CPU time taken.
set -euo pipefail
cd "$(dirname "$0")/.."

RAW=../shared/data/her2st OUT=runs/quality FOLDS="" SEEDS=42,1,2 EPOCHS=10 LR=1e-3 PRE_EPOCHS=2 SAMPLES=10
DATA_ONLY=0 ABLATIONS=1 JOBS=1 THREADS=1 DRY=0 BOOT=2000
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
    --jobs) JOBS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --bootstrap) BOOT="$2"; shift 2 ;;
    --data-only) DATA_ONLY=1; shift ;;
    --no-ablations) ABLATIONS=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"
               echo "options: --raw DIR --out DIR --folds C2,B4 --seeds 42,1,2 (trained rows, across patients)"
               echo "         --epochs N --lr LR (HINGE rows) --pretrain-epochs N --samples S (HINGE and scratch;"
               echo "         Gauss-Diff at K = 50 draws 2) --jobs N (processes at a time, default 1) --threads T"
               echo "         (torch threads per process, default 1) --bootstrap B (resamples of the intervals,"
               echo "         default 2000) --data-only --no-ablations --dry-run"
               exit 0 ;;
    *) echo "error: unknown option $1 (see bash bench/quality.sh --help)" >&2; exit 2 ;;
  esac
done
for v in JOBS THREADS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "error: --${v,,} ${!v}: give a whole number of at least 1" >&2; exit 2; }
done
command -v flock > /dev/null || { echo "error: flock (util-linux) not found; it locks each row while it runs" >&2; exit 2; }
# the thread count is part of what the numbers are: a reduction split over other threads rounds otherwise
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
[ "$DRY" = 1 ] || bash run_all.sh --install-only
PY=.venv/bin/python DATA=$OUT/data TIMES=$OUT/times.tsv LOGS=$OUT/logs LOCKS=$OUT/locks
mkdir -p "$OUT" "$LOGS" "$LOCKS"; touch "$TIMES"
T0=$EPOCHREALTIME

cpu_of_children() {  # cpu_of_children VAR: VAR = CPU seconds (user + system) of every process this shell waited for
  local f=$LOCKS/times.$BASHPID                  # named here: inside $(...) BASHPID is the subshell's
  times > "$f"                                   # in this shell: a subshell's `times` would count its own children
  printf -v "$1" '%s' "$(awk 'NR == 2 {gsub(",", "."); split($1, u, "m"); split($2, s, "m");
                                       printf "%.1f", u[1] * 60 + u[2] + s[1] * 60 + s[2]}' "$f")"
  rm -f "$f"
}

timed() {  # timed LABEL FOLD cmd...: run cmd, append "LABEL FOLD wall-seconds CPU-seconds" to times.tsv
  local label=$1 fold=$2 t0=$EPOCHREALTIME c0 c1; shift 2
  cpu_of_children c0
  "$@"
  cpu_of_children c1
  awk -v l="$label" -v f="$fold" -v a="$t0" -v b="$EPOCHREALTIME" -v c="$c0" -v d="$c1" \
      'BEGIN {printf "%s\t%s\t%.1f\t%.1f\n", l, f, b - a, d - c}' >> "$TIMES"   # one short line: appends stay whole
}

locked() {  # locked NAME cmd...: run cmd holding NAME's lock, waiting for another run that holds it
  local fd
  exec {fd}> "$LOCKS/$1.lock"
  flock "$fd"
  "${@:2}"
  exec {fd}>&-
}

echo "== data: Her2ST from $RAW, stain features"
# every slice with an image is a test slice of some fold: genes are selected on the others only
IMAGED=$(find "$RAW/ST-imgs" -mindepth 3 -maxdepth 3 -type f \( -iname '*.jp*g' -o -iname '*.png' -o -iname '*.tif*' \) \
         -exec dirname {} \; | xargs -n1 basename | sort -u | paste -sd,)
prepare() {  # once; a second run waits for the first and reads its data as is
  [ -f "$DATA/features/stain/done" ] && return
  $PY prepare_data.py --dataset her2st --raw "$RAW" --out "$DATA" --test-slices "$IMAGED"
  $PY extract_features.py --data "$DATA" --encoder stain
  touch "$DATA/features/stain/done"
}
if [ "$DRY" = 1 ] && [ ! -f "$DATA/features/stain/done" ]; then
  echo "(dry run: $DATA is not prepared yet; the folds come from it, so there is no plan to show)"; exit 0
fi
[ "$DRY" = 1 ] || locked data prepare
WITHIN=$(awk -F'\t' 'NR > 1 && $4 == 1 && $2 == "C" {print $1}' "$DATA/slices.tsv" | paste -sd,)
OTHERS=$(awk -F'\t' 'NR > 1 && $4 == 1 && $2 != "C" {print $1}' "$DATA/slices.tsv" | paste -sd,)  # B4
FOLDS=${FOLDS:-$WITHIN,$OTHERS}  # every fold trains on patient C's imaged slices other than its test slice
BACKBONE=$OUT/backbone.safetensors
SCGPT=$OUT/backbone_scgpt          # the scGPT row's, pre-trained alike: a checkpoint folder in scGPT's layout

table_of() { [[ ",$WITHIN," == *",$1,"* ]] && echo within || echo cross; }
tag_of() { [ "$1" = 42 ] || echo "@$1"; }      # seed 42 (every script's default) is the plain name

#################################################################################
#                 Jobs: each owns its outputs, skips what is done               #
#################################################################################

pretrain() {  # pretrain LABEL PRESET OUT: once, on the 30 slices without images (no fold's test slice is in it)
  [ -e "$3" ] || timed "$1" all $PY pretrain.py --data "$DATA" --exclude "$IMAGED" --preset "$2" \
                                  --epochs "$PRE_EPOCHS" --lr 3e-3 --out "$3"   # written whole, then renamed
}

baseline() {  # baseline METHOD FOLD SEED: one baselines.py run (the seed of the MLP and the peers)
  local m=$1 s=$2 seed=$3 extra=() dir
  dir=$OUT/pred/$(table_of "$s")/$m$(tag_of "$seed")
  [ -f "$dir/$s.h5" ] && return
  case $m in knn|stflow) extra=(--save-samples) ;; *_ctx8) extra=(--context 8) ;; esac  # samples: neighbours, draws
  timed "$m" "$s" $PY baselines.py --data "$DATA" --features stain --test-slice "$s" --exclude "$OTHERS" \
      --method "${m%_ctx8}" --seed "$seed" "${extra[@]}" --out "$dir"      # each peer: its paper's epochs
}

hinge() {  # hinge RUN FOLD SEED: one train.py run (skipped when finished), then each of its samplings not yet written
  local run=$1 s=$2 seed=$3 tag args=() samplings=() dir
  tag=$(tag_of "$seed")
  case $run in                                # sampling: method K S
    hinge_gaussian) args=(--backbone-ckpt "$BACKBONE" --head gaussian)   # HINGE as it ships (temperature 0.5)
                    samplings=("hinge_gaussian_K5 5 $SAMPLES")
                    if [ "$ABLATIONS" = 1 ]; then samplings+=("hinge_gaussian_K1 1 $SAMPLES"); fi ;;
    hinge_point) args=(--backbone-ckpt "$BACKBONE" --head point); samplings=("hinge_point_K5 5 $SAMPLES") ;;
    hinge_bins) args=(--backbone-ckpt "$BACKBONE" --head bins); samplings=("hinge_bins_K5 5 $SAMPLES") ;;
    hinge_ctx8) args=(--backbone-ckpt "$BACKBONE" --context 8); samplings=("hinge_ctx8_K5 5 $SAMPLES") ;;
    hinge_betanll) args=(--backbone-ckpt "$BACKBONE" --head beta-nll); samplings=("hinge_betanll_K5 5 $SAMPLES") ;;
    hinge_neighbourhood|hinge_slide|hinge_joint)                  # the spatial designs (train.py --spatial)
                args=(--backbone-ckpt "$BACKBONE" --spatial "${run#hinge_}"); samplings=("${run}_K5 5 $SAMPLES") ;;
    hinge_scgpt) args=(--preset scgpt-small --backbone-ckpt "$SCGPT"); samplings=("hinge_scgpt_K5 5 $SAMPLES") ;;
    gaussian) args=(--backbone-ckpt "$BACKBONE" --objective gaussian); samplings=("gaussian_K50 50 2") ;;  # DDIM
    scratch) args=(--variant scratch); samplings=("scratch_K5 5 $SAMPLES") ;;
  esac
  local r=$OUT/runs/$s/$run$tag
  if [ ! -f "$r/done" ]; then
    rm -rf "$r"
    timed "train:$run" "$s" $PY train.py --data "$DATA" --features stain --test-slice "$s" --exclude "$OTHERS" \
        --preset small --epochs "$EPOCHS" --lr "$LR" --seed "$seed" --out "$r" "${args[@]}"
    touch "$r/done"
  fi
  for x in "${samplings[@]}"; do
    read -r m k n <<< "$x"
    dir=$OUT/pred/$(table_of "$s")/$m$tag
    [ -f "$dir/$s.h5" ] || timed "$m" "$s" $PY sample.py --run "$r" --data "$DATA" --steps "$k" --samples "$n" \
                              --save-samples --out "$dir" --overwrite
  done
}

evaluate() {  # evaluate TABLE METHOD: score a prediction folder, unless its metrics are newer than every prediction
  local d=$OUT/pred/$1/$2 e=$OUT/eval/$1/$2
  # summary.json, evaluate.py's last table, after metrics.csv: a run killed between them scores again
  if [ -f "$e/summary.json" ] && [ -z "$(find "$d" -maxdepth 1 -name '*.h5' -newer "$e/summary.json")" ]; then
    return
  fi
  mkdir -p "$OUT/eval/$1"
  $PY evaluate.py --pred "$d" --data "$DATA" --out "$e" --label "$2" > "$e.log"
}

is_done() {  # is_done JOB...: whether the job would skip everything (for --dry-run and the progress lines)
  case $1 in
    pretrain) [ -e "$4" ] ;;
    baseline) [ -f "$OUT/pred/$(table_of "$3")/$2$(tag_of "$4")/$3.h5" ] ;;
    hinge) [ -f "$OUT/runs/$3/$2$(tag_of "$4")/done" ] && ! hinge_left "$2" "$3" "$4" ;;
    evaluate) local e=$OUT/eval/$2/$3/summary.json
              [ -f "$e" ] && [ -z "$(find "$OUT/pred/$2/$3" -maxdepth 1 -name '*.h5' -newer "$e")" ] ;;
  esac
}

hinge_left() {  # hinge_left RUN FOLD SEED: whether a sampling of this run is still to write
  local t tag
  t=$(table_of "$2") tag=$(tag_of "$3")
  case $1 in
    hinge_gaussian) [ ! -f "$OUT/pred/$t/hinge_gaussian_K5$tag/$2.h5" ] ||
                    { [ "$ABLATIONS" = 1 ] && [ ! -f "$OUT/pred/$t/hinge_gaussian_K1$tag/$2.h5" ]; } ;;
    gaussian) [ ! -f "$OUT/pred/$t/gaussian_K50$tag/$2.h5" ] ;;
    *) [ ! -f "$OUT/pred/$t/${1}_K5$tag/$2.h5" ] ;;
  esac
}

job_name() { echo "$*" | tr ' /' '-_'; }        # the job line as a file name: unique per job

run_jobs() {  # run_jobs PHASE < job lines: at most $JOBS at a time, each locked and logged; fails if one failed
  local phase=$1 lines=() i=0 n running=0 failed=0
  mapfile -t lines
  n=${#lines[@]}
  for line in "${lines[@]}"; do
    i=$((i + 1))
    read -ra job <<< "$line"
    local name
    name=$(job_name "${job[@]}")
    if is_done "${job[@]}"; then
      [ "$DRY" = 1 ] && echo "  done     ${job[*]}"
      continue
    fi
    if [ "$DRY" = 1 ]; then echo "  to run   ${job[*]}"; continue; fi
    if [ "$running" -ge "$JOBS" ]; then
      wait -n || failed=$((failed + 1))
      running=$((running - 1))
    fi
    (
      t0=$EPOCHREALTIME
      echo "[$phase $i/$n] ${job[*]}: started (log $LOGS/$name.log)"
      # in the background, not as an `if` condition, where bash would ignore set -e inside the job
      locked "$name" "${job[@]}" > "$LOGS/$name.log" 2>&1 &
      if wait $!; then
        awk -v a="$t0" -v b="$EPOCHREALTIME" -v j="${job[*]}" -v p="$phase" -v i="$i" -v n="$n" \
            'BEGIN {printf "[%s %d/%d] %s: finished in %.0f s\n", p, i, n, j, b - a}'
      else
        echo "[$phase $i/$n] ${job[*]}: FAILED, the end of $LOGS/$name.log:" >&2
        tail -n 15 "$LOGS/$name.log" >&2
        exit 1
      fi
    ) &
    running=$((running + 1))
  done
  while [ "$running" -gt 0 ]; do
    wait -n || failed=$((failed + 1))
    running=$((running - 1))
  done
  if [ "$failed" -gt 0 ]; then
    echo "error: $failed job(s) of $phase failed (logs above); re-run the same command to resume" >&2
    return 1
  fi
}

#################################################################################
#                                   The plan                                    #
#################################################################################

IFS=, read -ra folds <<< "$FOLDS"
IFS=, read -ra seed_list <<< "$SEEDS"
cross=0
for s in "${folds[@]}"; do [ "$(table_of "$s")" = cross ] && cross=1; done

echo "== pre-training ($JOBS job(s) at a time, $THREADS thread(s) each)"
{ echo "pretrain pretrain small $BACKBONE"
  if [ "$DATA_ONLY" = 0 ] && [ "$cross" = 1 ]; then echo "pretrain pretrain:scgpt scgpt-small $SCGPT"; fi
} | run_jobs pretrain
[ "$DATA_ONLY" = 1 ] && exit 0  # data, features and backbone only (bench/choose_gate.sh)

plan() {  # one line per row: the longest (HINGE's) first, so that the last jobs to start are short
  local s seeds hinge_runs
  hinge_runs="hinge_gaussian hinge_point hinge_ctx8 hinge_neighbourhood hinge_slide hinge_joint hinge_betanll"
  [ "$ABLATIONS" = 1 ] && hinge_runs+=" hinge_bins gaussian scratch"
  for s in "${folds[@]}"; do
    seeds=(42); [ "$(table_of "$s")" = cross ] && seeds=("${seed_list[@]}")
    for seed in "${seeds[@]}"; do
      for r in $hinge_runs; do echo "hinge $r $s $seed"; done
      if [ "$(table_of "$s")" = cross ]; then echo "hinge hinge_scgpt $s $seed"; fi
    done
  done
  for s in "${folds[@]}"; do
    seeds=(42); [ "$(table_of "$s")" = cross ] && seeds=("${seed_list[@]}")
    for seed in "${seeds[@]}"; do                # trained rows: one per seed
      for m in stflow triplex merge mlp mlp_ctx8; do echo "baseline $m $s $seed"; done
    done
    for m in mean ridge knn ridge_ctx8; do echo "baseline $m $s 42"; done  # fitted in closed form: nothing to seed
  done
}
echo "== rows: folds $FOLDS"
plan | run_jobs rows

echo "== evaluate"
for d in "$OUT"/pred/*/*/; do  # pred/<within|cross>/<method[@seed]>/
  if [ -d "$d" ]; then echo "evaluate $(basename "$(dirname "$d")") $(basename "$d")"; fi
done | run_jobs evaluate
[ "$DRY" = 1 ] && exit 0

$PY - "$OUT" "$FOLDS" "$BOOT" <<'EOF'
import glob, json, os, sys
import numpy as np
import pandas as pd
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
sys.path.insert(0, ".")
from evaluate import paired_difference
out, folds, n_boot = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
times = pd.read_csv(f"{out}/times.tsv", sep="\t", names=["label", "fold", "s", "cpu"])
names = {"mean": "training mean", "ridge": "ridge", "mlp": "MLP head", "knn": "kNN", "gaussian_K50": "Gauss-Diff K=50",
         "scratch_K5": "scratch K=5", "hinge_gaussian_K1": "HINGE K=1", "hinge_gaussian_K5": "HINGE K=5",
         "hinge_point_K5": "HINGE point K=5", "hinge_bins_K5": "HINGE bins K=5", "stflow": "STFlow",
         "triplex": "TRIPLEX", "merge": "MERGE", "ridge_ctx8": "ridge --context 8", "mlp_ctx8": "MLP --context 8",
         "hinge_ctx8_K5": "HINGE --context 8 K=5", "hinge_scgpt_K5": "HINGE scGPT-small K=5",
         "hinge_neighbourhood_K5": "HINGE --spatial neighbourhood K=5", "hinge_slide_K5": "HINGE --spatial slide K=5",
         "hinge_joint_K5": "HINGE --spatial joint K=5", "hinge_betanll_K5": "HINGE beta-nll K=5"}
fit_of = {"gaussian_K50": "train:gaussian", "scratch_K5": "train:scratch", "hinge_gaussian_K1": "train:hinge_gaussian",
          "hinge_bins_K5": "train:hinge_bins", "hinge_point_K5": "train:hinge_point",
          "hinge_gaussian_K5": "train:hinge_gaussian", "hinge_ctx8_K5": "train:hinge_ctx8",
          "hinge_scgpt_K5": "train:hinge_scgpt", "hinge_neighbourhood_K5": "train:hinge_neighbourhood",
          "hinge_slide_K5": "train:hinge_slide", "hinge_joint_K5": "train:hinge_joint",
          "hinge_betanll_K5": "train:hinge_betanll"}
cols = ["PCC-50", "mean_r", "MSE", "bias2", "SSIM", "CRPS", "cover50", "cover90", "spread_skill", "struct_r",
        "struct_r_sample", "struct_r_partial"]
titles = {"within": "within patient C: leave-one-slice-out, mean ± std over folds",
          "cross": "across patients: train C2-C6, test B4, mean ± std over the trained rows' seeds"}
REF = "hinge_gaussian_K5"                                # the HINGE default: every difference is to it


def cell(v):
    v = v.dropna()
    if not len(v):
        return "–"
    return f"{v.mean():.3f}" + (f"±{v.std():.3f}" if len(v) > 1 else "")


def interval(d):
    """method − HINGE default [95 % interval]; bold when the interval leaves out 0."""
    if d is None or d[0] != d[0]:
        return "–"
    text = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"
    return f"**{text}**" if d[1] > 0 or d[2] < 0 else text


def runs_of(t, m):                                       # the method's prediction folders: one per seed
    return sorted(glob.glob(f"{out}/pred/{t}/{m}") + glob.glob(f"{out}/pred/{t}/{m}@*"))


for t in ("within", "cross"):
    rows, curves, shown = [], {}, []
    for m in names:
        dirs = [d for d in sorted(glob.glob(f"{out}/eval/{t}/{m}") + glob.glob(f"{out}/eval/{t}/{m}@*"))
                if os.path.isfile(f"{d}/metrics.csv")]
        if not dirs:
            continue
        df = pd.concat([pd.read_csv(f"{d}/metrics.csv") for d in dirs])
        df = df[df.slice.isin(folds)]
        if not len(df):                                  # predicted only for folds not asked for
            continue
        shown.append(m)
        tm = times[times.fold.isin(df.slice)]
        fit = tm[tm.label == fit_of[m]].cpu.mean() if m in fit_of else float("nan")   # CPU s: the same under load
        rows.append([names[m]] + [cell(df[c]) if c in df else "–" for c in cols]
                    + ["–" if fit != fit else f"{fit:.0f}", f"{tm[tm.label == m].cpu.mean():.1f}"])
        cal = [json.load(open(f"{d}/summary.json")).get("calibration") for d in dirs]
        if cal[0]:
            curves[names[m]] = (cal[0]["levels"], np.mean([c["coverage"] for c in cal], 0),
                                np.mean([c.get("raw_coverage", c["coverage"]) for c in cal], 0))
    if not rows:
        continue
    print(f"\nHer2ST, stain features, {titles[t]}")
    head = ["method"] + cols + ["fit CPU s", "predict CPU s"]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if REF in shown:
        print(f"\nDifference to {names[REF]}, the HINGE default (method − it; mean over the test slices) [95 % "
              f"interval: {n_boot} resamples of each slice's test spots, the same for both methods, each method's "
              "seeds averaged]; bold: the interval leaves out 0")
        keys = ["PCC-50", "MSE", "CRPS"]
        print("| method | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 1))
        for m in shown:
            if m != REF:
                d = paired_difference(runs_of(t, m), runs_of(t, REF), f"{out}/data", folds, n_boot)
                print(f"| {names[m]} | " + " | ".join(interval(d and d[k]) for k in keys) + " |")
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.8))
    for ax, k, what in ((axes[0], 2, "raw spread (--no-calibrate)"), (axes[1], 1, "calibrated on validation spots")):
        ax.plot([0, 1], [0, 1], ":", color="0.5")
        for i, (label, c) in enumerate(curves.items()):   # ten colours, then the same ten dashed: no two alike
            ax.plot(c[0], c[k], "o-" if i < 10 else "s--", ms=3, color=f"C{i % 10}", label=label)
        ax.set_xlabel("nominal level of the central interval"); ax.set_ylabel("observed coverage of truth")
        ax.set_xlim(0, 1); ax.set_ylim(0, 1); ax.set_aspect("equal")
        ax.set_title(f"{what}, {t} patient", fontsize=9)
    axes[0].legend(fontsize=6, loc="upper left")
    fig.tight_layout(); fig.savefig(f"{out}/calibration_{t}.png", dpi=120); plt.close(fig)
    print(f"(calibration curves: {out}/calibration_{t}.png)")
pre = times[times.label == "pretrain"].cpu
if len(pre):
    print(f"(HINGE and Gauss-Diff share one pretrain.py backbone: {pre.iloc[0]:.0f} CPU s once, for all folds)")
pre = times[times.label == "pretrain:scgpt"].cpu
if len(pre):
    print(f"(the scGPT-small backbone of HINGE scGPT-small: pretrain.py, {pre.iloc[0]:.0f} CPU s once)")
print("(the training mean is one value per gene: its r and structure are undefined; ridge's and the MLP's std is one "
      "value per gene, so their spread_skill is undefined; Gauss-Diff at K = 50 draws S = 2 samples, the others 10)")
EOF
cpu_of_children CPU
awk -v c="$CPU" -v a="$T0" -v b="$EPOCHREALTIME" -v j="$JOBS" -v t="$THREADS" 'BEGIN {
  printf "(this run took %.0f CPU minutes, every process, user + system, in %.0f minutes of wall time with %d " \
         "job(s) of %d thread(s); rows finished before it are not counted)\n", c / 60, (b - a) / 60, j, t}'
