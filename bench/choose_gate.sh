#!/usr/bin/env bash
# How train.py's default SoftAdaLN gate was chosen (README "Quality benchmark"): HINGE trained with the
# official sigmoid(g) gate and with the residual 1 + g gate, on the Her2ST quality benchmark's five
# within-patient folds C2-C6 (its settings) and on the demo's two folds (run_all.sh's settings), scored on
# each fold's validation spots only (10 % of its training spots, seed 42).
#
#   bash bench/choose_gate.sh                # about 25 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/quality.sh --data-only                  # Her2ST data, stain features and the shared backbone
PY=.venv/bin/python Q=runs/quality OUT=runs/choose_gate
DEMO=$OUT/demo
[ -f "$DEMO/test_slices.txt" ] || $PY prepare_data.py --out "$DEMO" --test-slices first-per-patient
$PY extract_features.py --data "$DEMO" --encoder stain

train() {  # train NAME args...: one train.py run, skipped when finished
  local out=$OUT/$1; shift
  [ -f "$out/done" ] || { rm -rf "$out"; $PY train.py "$@" --out "$out" && touch "$out/done"; }
}
for s in demo1 demo3; do
  [ -f "$OUT/backbone_$s.safetensors" ] || $PY pretrain.py --data "$DEMO" --exclude "$s" --preset tiny --epochs 20 \
                                              --lr 3e-3 --out "$OUT/backbone_$s.safetensors"
done
for gate in sigmoid residual; do
  for s in C2 C3 C4 C5 C6; do
    train "her2st_${s}_$gate" --data $Q/data --features stain --test-slice $s --exclude B4 --preset small --epochs 10 \
        --lr 1e-3 --backbone-ckpt $Q/backbone.safetensors --gate $gate
  done
  for s in demo1 demo3; do
    train "demo_${s}_$gate" --data "$DEMO" --features stain --test-slice $s --preset tiny --epochs 30 --lr 3e-3 \
        --backbone-ckpt "$OUT/backbone_$s.safetensors" --gate $gate
  done
done
for s in C2 C3 C4 C5 C6; do
  echo "== validation spots of Her2ST fold $s"
  $PY bench/validate.py --data $Q/data --runs $OUT/her2st_${s}_sigmoid $OUT/her2st_${s}_residual --steps 1,5
done
for s in demo1 demo3; do
  echo "== validation spots of demo fold $s"
  $PY bench/validate.py --data "$DEMO" --runs $OUT/demo_${s}_sigmoid $OUT/demo_${s}_residual --steps 1,5
done
