"""Virtual spatial transcriptomics against measured spots, on real Her2ST.

    python bench/virtual_st.py [--raw ../shared/data/her2st] [--out runs/virtual_st]

Trains HINGE on C3-C6 (stain features, the settings of bench/quality.sh), then predicts C2 twice:
in spot mode (sample.py on C2's measured spots) and through the image path, as for a slide without
spatial data (C2's H&E alone, a dense hexagonal grid of 50 µm pitch, so that every measured spot
has a grid point within 50/√3 = 29 µm, and the ST spot diameter of 100 µm). At the grid point
nearest each measured spot it reports how far the two predictions agree (per-gene r across spots)
and how both score against C2's measured expression. Re-running reuses finished steps.
"""
import argparse
import glob
import os
import subprocess
import sys
import time

import h5py
import numpy as np
from scipy.spatial import cKDTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from evaluate import pearson_per_gene, top_k_mean  # noqa: E402


def step(label, out, *cmd):
    """Run a stage script unless `out` exists; print its wall time."""
    if os.path.exists(out):
        return
    t0 = time.time()
    subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)
    print(f"[{label}: {time.time() - t0:.0f} s]", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default=os.path.join(ROOT, "..", "shared", "data", "her2st"), help="Her2ST data folder")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "virtual_st"), help="output folder")
    p.add_argument("--pitch", type=float, default=50.0, help="grid pitch in µm (default 50)")
    p.add_argument("--samples", type=int, default=5, help="samples per spot in both modes (default 5)")
    a = p.parse_args()
    out, data = os.path.abspath(a.out), os.path.join(os.path.abspath(a.out), "data")

    others = sorted(os.path.basename(p)[:-len(".tsv.gz")] for p in glob.glob(os.path.join(a.raw, "ST-cnts", "*.tsv.gz")))
    step("prepare", os.path.join(data, "slices.tsv"), "prepare_data.py", "--dataset", "her2st", "--raw", a.raw, "--out", data,
         "--select-from", ",".join(n for n in others if n != "C2"))  # genes chosen without the test slice
    step("features", os.path.join(data, "features", "stain", "C2.h5"), "extract_features.py", "--data", data, "--encoder", "stain")
    with open(os.path.join(data, "slices.tsv")) as f:
        imaged = [r.split("\t")[0] for r in f.read().splitlines()[1:] if r.split("\t")[3] == "1"]
    backbone = os.path.join(out, "backbone.safetensors")  # as bench/quality.sh: pre-trained on the slices without images
    step("pretrain", backbone, "pretrain.py", "--data", data, "--exclude", ",".join(imaged), "--preset", "small",
         "--epochs", "2", "--lr", "3e-3", "--out", backbone)
    run = os.path.join(out, "run")
    step("train on C3-C6", os.path.join(run, "best.pt"), "train.py", "--data", data, "--features", "stain",
         "--test-slice", "C2", "--exclude", "B4", "--preset", "small", "--epochs", "10", "--lr", "1e-3",
         "--backbone-ckpt", backbone, "--out", run)
    sampling = ["--steps", "5", "--samples", str(a.samples)]
    step("sample C2 spots", os.path.join(out, "spots", "C2.h5"), "sample.py", "--run", run, "--data", data,
         *sampling, "--out", os.path.join(out, "spots"))

    with h5py.File(os.path.join(data, "slices", "C2.h5"), "r") as f:
        um, truth, spot_px = float(f.attrs["pixel_size_um"]), f["expr"][()], f["pixel"][()]
    image = glob.glob(os.path.join(a.raw, "ST-imgs", "C", "C2", "*.jpg"))[0]
    name = os.path.splitext(os.path.basename(image))[0]
    grid = os.path.join(out, "grid")
    step("prepare grid", os.path.join(grid, "slices.tsv"), "prepare_data.py", "--dataset", "image", "--image", image,
         "--pixel-size", f"{um:.6f}", "--spot-pitch-um", str(a.pitch), "--spot-diameter-um", "100", "--out", grid)
    step("grid features", os.path.join(grid, "features", "stain", f"{name}.h5"), "extract_features.py", "--data", grid,
         "--encoder", "stain")
    step("sample grid", os.path.join(out, "grid_pred", f"{name}.h5"), "sample.py", "--run", run, "--data", grid,
         "--slices", name, *sampling, "--out", os.path.join(out, "grid_pred"))

    with h5py.File(os.path.join(out, "spots", "C2.h5"), "r") as f:
        spot_pred = f["pred"][()]
    with h5py.File(os.path.join(out, "grid_pred", f"{name}.h5"), "r") as f:
        grid_pred, secs = f["pred"][()], f.attrs["seconds"]
    with h5py.File(os.path.join(grid, "slices", f"{name}.h5"), "r") as f:
        grid_px = f["pixel"][()]
    dist, nearest = cKDTree(grid_px).query(spot_px)
    on_grid = dist * um <= 35.0                          # measured spots with a grid point within 35 µm
    g = grid_pred[nearest[on_grid]]
    agree = pearson_per_gene(spot_pred[on_grid], g)

    def scores(pred):
        r = pearson_per_gene(truth[on_grid], pred)
        return top_k_mean(r, 50), float(np.nanmean(r)), float(((truth[on_grid] - pred) ** 2).mean())

    print(f"\nC2: {len(grid_px)} grid points ({a.pitch:g} µm hexagonal, {secs:.0f} s to sample at "
          f"{len(grid_px) / secs:.1f} spots/s); {on_grid.sum()} of {len(spot_px)} measured spots have one within 35 µm "
          f"(farthest {dist.max() * um:.1f} µm)")
    print(f"agreement, grid point vs spot mode, per-gene r across those spots: median {np.nanmedian(agree):.3f} "
          f"(quartiles {np.nanpercentile(agree, 25):.3f}-{np.nanpercentile(agree, 75):.3f}, {len(agree)} genes)")
    print(f"{'against C2 truth':<20}{'PCC-50':>9}{'mean r':>9}{'MSE':>9}")
    for label, pred in (("spot mode", spot_pred[on_grid]), ("image path (grid)", g)):
        pcc, mr, mse = scores(pred)
        print(f"{label:<20}{pcc:>9.3f}{mr:>9.3f}{mse:>9.3f}")
    train_mean = np.concatenate([h5py.File(os.path.join(data, "slices", f"{s}.h5"), "r")["expr"][()]
                                 for s in ("C3", "C4", "C5", "C6")]).mean(0)
    print(f"{'training mean':<20}{'–':>9}{'–':>9}{((truth[on_grid] - train_mean) ** 2).mean():>9.3f}")


if __name__ == "__main__":
    main()
