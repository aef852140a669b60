#!/usr/bin/env bash
# HINGE end to end: set up .venv, then prepare -> features -> pretrain -> train -> sample -> evaluate,
# leave-one-slice-out over a test pool; or, with --predict, a trained run applied to H&E slides that
# have no spatial data. `bash run_all.sh --help` lists the options.
# Re-running continues where an interrupted run stopped: finished stages and folds are skipped.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'HELP'
usage: bash run_all.sh [options]

  --dataset NAME        demo (default: synthetic, offline, CPU minutes), her2st, visium, visium-hd (16 µm bins) or hest
  --raw DIR             raw data folder (her2st, visium, visium-hd, hest)
  --bin-um 8|16         visium-hd: the Space Ranger bin size to read (default 16)
  --out DIR             output folder (default runs/<dataset>)
  --test-slices A,B     held-out slices, one fold each (default: demo and her2st the first slice of each
                        patient that has an image; visium/hest every slice with an image)
  --encoder NAME        stain (default, weight-free), uni, conch, resnet50, or uni,conch (the paper's 1536-d)
  --weights PATHS       weights of the neural encoders, comma-separated in --encoder order
  --backbone-ckpt PATH  backbone weights: CellFM's (official .ckpt/.safetensors) or an scGPT folder (best_model.pt,
                        args.json, vocab.json); without it pretrain.py builds a backbone per fold from the training
                        slices' expression (--cellfm-ckpt: the same)
  --preset NAME         backbone and size: tiny (demo default), small (default otherwise), cellfm-80m, cellfm-800m;
                        scGPT: scgpt-tiny, scgpt-small, scgpt (whole-human; the default with an scGPT folder)
  --epochs N            training epochs at most (demo 30; real data 50 = the paper on a GPU, 10 on a CPU)
  --pretrain-epochs N   pretrain.py epochs when no --backbone-ckpt (demo 20; real data 10 on a GPU, 2 on a CPU)
  --lr LR               training learning rate (demo 3e-3; real data 1e-4 = the paper on a GPU, 1e-3 on a CPU)
  --pretrain-lr LR      pretrain.py learning rate (default 3e-3)
  --steps K             sampling step budget (default 5)
  --samples S           samples per spot, averaged (default 5)
  --seed N              seed of pretrain.py, train.py and sample.py (default: each script's own); the README's
                        demo spread is over the default and --seed 1, 2
  --vocab FILE          the backbone's vocabulary, CellFM gene_info.csv or scGPT vocab.json: keep vocabulary genes,
                        store token ids (needed with --backbone-ckpt)
  --install-only        only create or update .venv from requirements.txt

Slides without spatial data (virtual spatial transcriptomics):
  --predict SLIDES      H&E slides or folders of slides, comma-separated (.svs, .ndpi, .mrxs, .tif, .jpg, .png):
                        predict expression on a grid of pseudo-spots with --run, write AnnData (.h5ad) files
                        and maps, then stop (output in --out, default runs/predict); patches are cropped from
                        the slides when embedded, not stored, so keep the slides where they are until then
  --run DIR             the trained run (a train.py folder, e.g. runs/her2st/folds/C2) that --predict uses
  --pixel-size UM       µm per pixel of the slides, when their metadata lacks it (always for .jpg/.png)
  --spot-pitch-um UM    pseudo-spot spacing (default 100, Visium); --spot-diameter-um UM (default 55, Visium;
                        use the diameter of the spots the run was trained on, e.g. 100 for Her2ST's ST spots)
  --grid hex|square     pseudo-spot grid (default hex, as Visium)
  -h, --help            this help
HELP
}

DATASET=demo RAW="" OUT="" TEST="" ENCODER=stain WEIGHTS="" CKPT="" PRESET="" EPOCHS="" PRE_EPOCHS="" LR="" PRE_LR=3e-3
STEPS=5 SAMPLES=5 SEED=() VOCAB="" INSTALL_ONLY=0 PREDICT="" RUN="" GRID_ARGS=() BIN_UM=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) DATASET="$2"; shift 2 ;;
    --raw) RAW="$2"; shift 2 ;;
    --bin-um) BIN_UM="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --test-slices) TEST="$2"; shift 2 ;;
    --encoder) ENCODER="$2"; shift 2 ;;
    --weights) WEIGHTS="$2"; shift 2 ;;
    --backbone-ckpt|--cellfm-ckpt) CKPT="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --pretrain-epochs) PRE_EPOCHS="$2"; shift 2 ;;
    --lr) LR="$2"; shift 2 ;;
    --pretrain-lr) PRE_LR="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --samples) SAMPLES="$2"; shift 2 ;;
    --seed) SEED=(--seed "$2"); shift 2 ;;
    --vocab) VOCAB="$2"; shift 2 ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    --predict) PREDICT="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --pixel-size|--spot-pitch-um|--spot-diameter-um|--grid) GRID_ARGS+=("$1" "$2"); shift 2 ;;
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

predict() {  # predict RUN SLIDES OUT: slides -> pseudo-spots -> features -> generated expression -> .h5ad + maps
  local run=$1 out=$3 imgs encoders names
  IFS=, read -ra imgs <<< "$2"
  echo "== predict: ${imgs[*]} with $run"
  $PY prepare_data.py --dataset image --image "${imgs[@]}" "${GRID_ARGS[@]}" --out "$out/data"
  encoders=$($PY -c "import sys, torch; print(','.join(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['features']))" "$run/best.pt")
  features "$out/data" "$encoders"
  names=$(awk -F'\t' 'NR > 1 {print $1}' "$out/data/slices.tsv" | paste -sd,)
  $PY sample.py --run "$run" --data "$out/data" --slices "$names" --steps "$STEPS" --samples "$SAMPLES" --out "$out/pred" --overwrite
  $PY evaluate.py --pred "$out/pred" --data "$out/data" --out "$out/eval"
  echo "AnnData (open with scanpy.read_h5ad; scanpy.pl.spatial(adata, color=GENE) draws it over the H&E):"
  ls "$out"/pred/*.h5ad
}

features() {  # features DATA ENCODERS: embed every slice with each encoder (weights from --weights, in order)
  local enc weights i
  IFS=, read -ra enc <<< "$2"
  IFS=, read -ra weights <<< "$WEIGHTS"
  for i in "${!enc[@]}"; do
    feat=(--data "$1" --encoder "${enc[$i]}")
    [ -n "${weights[$i]:-}" ] && feat+=(--weights "${weights[$i]}")
    $PY extract_features.py "${feat[@]}"
  done
}

if [ -n "$PREDICT" ]; then
  [ -n "$RUN" ] && [ -f "$RUN/best.pt" ] || { echo "error: --predict needs --run DIR, a train.py run folder with best.pt (got '${RUN}')" >&2; exit 2; }
  predict "$RUN" "$PREDICT" "${OUT:-runs/predict}"
  exit 0
fi

[ -d "$CKPT" ] && PRESET=${PRESET:-scgpt}  # an scGPT folder: its args.json and tensors set the size
# Defaults: the demo sized for minutes on a CPU; real data with the paper's protocol on a GPU, and on
# a CPU the budget of bench/quality.sh (10 epochs at lr 1e-3: the paper's 50 at 1e-4 take hours there)
if [ "$DATASET" = demo ]; then
  PRESET=${PRESET:-tiny} EPOCHS=${EPOCHS:-30} PRE_EPOCHS=${PRE_EPOCHS:-20} LR=${LR:-3e-3}
elif $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  PRESET=${PRESET:-small} EPOCHS=${EPOCHS:-50} PRE_EPOCHS=${PRE_EPOCHS:-10} LR=${LR:-1e-4}
else
  PRESET=${PRESET:-small} EPOCHS=${EPOCHS:-10} PRE_EPOCHS=${PRE_EPOCHS:-2} LR=${LR:-1e-3}
fi
OUT=${OUT:-runs/$DATASET}
DATA=$OUT/data

echo "== prepare ($DATASET)"
prep=(--dataset "$DATASET" --out "$DATA")
[ -n "$RAW" ] && prep+=(--raw "$RAW")
[ -n "$VOCAB" ] && prep+=(--vocab "$VOCAB")
[ -n "$BIN_UM" ] && prep+=(--bin-um "$BIN_UM")
if [ -n "$TEST" ]; then  # held-out slices are checked first and kept out of gene selection
  prep+=(--test-slices "$TEST")
elif [ "$DATASET" = her2st ] || [ "$DATASET" = demo ]; then  # default pool: the first imaged slice of each patient
  prep+=(--test-slices first-per-patient)
fi
$PY prepare_data.py "${prep[@]}"
[ -f "$DATA/test_slices.txt" ] && TEST=$(paste -sd, "$DATA/test_slices.txt")

echo "== features ($ENCODER)"
features "$DATA" "$ENCODER"

if [ -z "$TEST" ]; then  # visium/hest: every slice with an image (slices.tsv: slice, patient, n_spots, has_image)
  TEST=$(awk -F'\t' 'NR > 1 && $4 == 1 {print $1}' "$DATA/slices.tsv" | paste -sd,)
  echo "(genes were selected over every slice, the test slices included: pass --test-slices to hold some out of it)"
fi
echo "== leave-one-slice-out over: $TEST"
IFS=, read -ra folds <<< "$TEST"
for s in "${folds[@]}"; do
  run=$OUT/folds/$s
  [ -f "$OUT/pred/$s.h5ad" ] && { echo "-- $s: done"; continue; }  # the AnnData twin is written last
  backbone=$CKPT
  if [ -z "$CKPT" ]; then
    backbone=$OUT/folds/backbone_$s.safetensors
    [[ $PRESET == scgpt* ]] && backbone=$OUT/folds/backbone_$s  # scGPT's layout: a folder
    [ -e "$backbone" ] || { echo "-- $s: pretrain"; $PY pretrain.py --data "$DATA" --exclude "$s" --preset "$PRESET" \
                              --epochs "$PRE_EPOCHS" --lr "$PRE_LR" --out "$backbone" "${SEED[@]}"; }
  fi
  echo "-- $s: train"
  resume=(); [ -f "$run/last.pt" ] && resume=(--resume)
  $PY train.py --data "$DATA" --features "$ENCODER" --test-slice "$s" --out "$run" --preset "$PRESET" \
      --backbone-ckpt "$backbone" --epochs "$EPOCHS" --lr "$LR" "${SEED[@]}" "${resume[@]}"
  echo "-- $s: sample"
  $PY sample.py --run "$run" --data "$DATA" --steps "$STEPS" --samples "$SAMPLES" --out "$OUT/pred" --overwrite \
      "${SEED[@]}"
done

echo "== reference rows: the training mean and ridge regression on the same folds and features (seconds)"
for s in "${folds[@]}"; do
  for m in mean ridge; do
    [ -f "$OUT/reference/$m/$s.h5" ] || $PY baselines.py --data "$DATA" --features "$ENCODER" --test-slice "$s" \
                                            --method "$m" --out "$OUT/reference/$m"
  done
done

echo "== evaluate"
for m in mean ridge; do
  $PY evaluate.py --pred "$OUT/reference/$m/" --data "$DATA" --out "$OUT/reference/$m/eval" --label "$m" > /dev/null
done
$PY evaluate.py --pred "$OUT/pred" --data "$DATA" --out "$OUT/eval" --label "HINGE $PRESET ($ENCODER, K=$STEPS)"
echo
echo "HINGE against the reference rows (mean ± std over the held-out slices; the mean predictor has no r):"
$PY evaluate.py --compare "$OUT/eval" "$OUT/reference/mean/eval" "$OUT/reference/ridge/eval"

if [ "$DATASET" = demo ]; then  # the virtual-ST path on a demo slide's image, its counts ignored
  predict "$OUT/folds/${folds[0]}" "$DATA/images/${folds[0]}.tif" "$OUT/predict"
fi
