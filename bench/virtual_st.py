"""Virtual spatial transcriptomics against measured spots, on real Her2ST.

    python bench/virtual_st.py [--raw ../shared/data/her2st] [--out runs/virtual_st]
    python bench/virtual_st.py --slice B4 --grid square --pitch 16 --grid-samples 1 --context 0 --baselines ""

Trains HINGE on the other imaged slices of patient C (stain features; the data, backbone and runs of
bench/quality.sh's fold of --slice, default C2, reused when that has run), then predicts the slice twice:
in spot mode (sample.py on its measured spots) and through the image path, as for a slide without
spatial data (its H&E alone, a hexagonal grid of --pitch µm, default 50, so that every measured
spot on tissue has a grid point within pitch/√3, and the ST spot diameter of 100 µm). At the grid
point nearest each measured spot it reports how far the two predictions agree (per-gene r across spots)
and how both score against the measured expression. With --grid square the grid is bins as wide as the
pitch (--pitch 8 or 16: Visium HD's), and each measured spot gets the mean of the bins whose centres lie
within its 100 µm footprint, as Visium HD's bins are summed into larger ones. With --context K a second
HINGE sees each spot's K-neighbour mean features too: on the grid its neighbourhood is the same radius in µm, not K grid
points, and it is compared the same way, as are the --baselines (baselines.py --predict-data on the
grid; ridge with the same --context; the slide-context peers with a fixed epoch count). Re-running
reuses finished steps.
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
import peers as P  # noqa: E402
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
    p.add_argument("--slice", default="C2", help="the imaged slice to predict (default C2; B4: across patients)")
    p.add_argument("--pitch", type=float, default=50.0, help="grid pitch in µm (default 50)")
    p.add_argument("--grid", choices=["hex", "square"], default="hex",
                   help="hex: pseudo-spots of 100 µm (default); square: bins as wide as --pitch")
    p.add_argument("--samples", type=int, default=5, help="samples per spot in both modes (default 5)")
    p.add_argument("--grid-samples", type=int, help="samples per grid point, when not --samples: bins are averaged "
                                                    "over a spot anyway, and are many")
    p.add_argument("--context", type=int, default=8, help="also a HINGE with --context K, and the spot-level "
                                                          "--baselines with it (default 8; 0: none)")
    p.add_argument("--baselines", default="ridge,stflow,triplex,merge",
                   help="baselines.py methods fitted on the same fold and predicted both ways (default "
                        "ridge,stflow,triplex,merge; empty: none)")
    a = p.parse_args()
    out = os.path.abspath(a.out)

    # the quality benchmark's data (genes chosen on the 30 slices without images), backbone and fold runs
    subprocess.run(["bash", "bench/quality.sh", "--raw", a.raw, "--data-only"], check=True, cwd=ROOT)
    quality = os.path.join(ROOT, "runs", "quality")
    data, backbone = os.path.join(quality, "data"), os.path.join(quality, "backbone.safetensors")
    test = a.slice
    with h5py.File(os.path.join(data, "slices", f"{test}.h5"), "r") as f:
        um, truth, spot_px = float(f.attrs["pixel_size_um"]), f["expr"][()], f["pixel"][()]
    image = glob.glob(os.path.join(a.raw, "ST-imgs", test[0], test, "*.jpg"))[0]
    name = os.path.splitext(os.path.basename(image))[0]
    where = f"{test}_{a.grid}{a.pitch:g}"                # one folder per slice and grid: runs of each are kept
    grid = os.path.join(out, f"grid_{where}")
    size = ["--spot-diameter-um", "100"] if a.grid == "hex" else ["--grid", "square"]   # bins: as wide as the pitch
    step("prepare grid", os.path.join(grid, "slices.tsv"), "prepare_data.py", "--dataset", "image", "--image", image,
         "--pixel-size", f"{um:.6f}", "--spot-pitch-um", str(a.pitch), *size, "--out", grid)
    step("grid features", os.path.join(grid, "features", "stain", f"{name}.h5"), "extract_features.py", "--data", grid,
         "--encoder", "stain")
    with h5py.File(os.path.join(grid, "slices", f"{name}.h5"), "r") as f:
        grid_px = f["pixel"][()]
    if a.grid == "hex":
        dist, nearest = cKDTree(grid_px).query(spot_px)
        reach = a.pitch / np.sqrt(3) + 5                 # the farthest a hex grid's point can be from tissue, + 5 µm
        on_grid = dist * um <= reach                     # measured spots on detected tissue
        pick = nearest.reshape(-1, 1)                    # the grid point standing for each spot
        how = f"have one within {reach:.0f} µm (farthest {dist.max() * um:.1f} µm)"
    else:
        pick = cKDTree(grid_px).query_ball_point(spot_px, 50 / um)   # the bins inside each 100 µm spot
        full = np.pi * 50 ** 2 / a.pitch ** 2
        on_grid = np.array([len(b) >= full / 2 for b in pick])       # spots at least half on detected tissue
        how = f"have at least half of their ~{full:.0f} bins on detected tissue"
    print(f"\n{test}: {len(grid_px)} grid points ({a.pitch:g} µm {'hexagonal' if a.grid == 'hex' else 'bins'}); "
          f"{on_grid.sum()} of {len(spot_px)} measured spots {how}")
    fold = ["--data", data, "--features", "stain", "--test-slice", test, "--exclude", "B4"]
    rows = []                                            # (label, spot-mode file, grid file)
    for k in sorted({0, a.context}):
        tag = f"context{k}" if k else "plain"
        # bench/quality.sh's names
        run = os.path.join(quality, "runs", test, f"hinge_ctx{k}" if k else "hinge_gaussian")
        step(f"train without {test} ({tag})", os.path.join(run, "done"), "train.py", *fold, "--preset", "small",
             "--epochs", "10", "--lr", "1e-3", "--backbone-ckpt", backbone, "--context", str(k), "--out", run)
        open(os.path.join(run, "done"), "w").close()
        sampling = ["--run", run, "--steps", "5"]
        spots, grid_out = os.path.join(out, f"spots_{test}_{tag}"), os.path.join(out, f"pred_{where}_{tag}")
        step(f"sample {test} spots ({tag})", os.path.join(spots, f"{test}.h5"), "sample.py", "--data", data,
             *sampling, "--samples", str(a.samples), "--out", spots)
        step(f"sample grid ({tag})", os.path.join(grid_out, f"{name}.h5"), "sample.py", "--data", grid,
             "--slices", name, *sampling, "--samples", str(a.grid_samples or a.samples), "--out", grid_out)
        rows.append((f"HINGE{f' --context {k}' if k else ''}", os.path.join(spots, f"{test}.h5"),
                     os.path.join(grid_out, f"{name}.h5")))
    for method in a.baselines.split(",") if a.baselines else []:
        extra = ["--context", str(a.context)] if method in ("ridge", "mlp", "knn") and a.context else \
            ["--epochs", "20", "--budget-s", "0"] if method in P.PEERS else []
        # a fixed epoch count, not a time budget: the spot-mode and the grid call fit the very same model
        spots, grid_out = os.path.join(out, f"spots_{test}_{method}"), os.path.join(out, f"pred_{where}_{method}")
        step(f"{method} on {test} spots", os.path.join(spots, f"{test}.h5"), "baselines.py", *fold, "--method",
             method, *extra, "--out", spots)
        step(f"{method} on the grid", os.path.join(grid_out, f"{name}.h5"), "baselines.py", *fold, "--method", method,
             *extra, "--predict-data", grid, "--out", grid_out)
        rows.append((f"{method}{' --context ' + str(a.context) if '--context' in extra else ''}",
                     os.path.join(spots, f"{test}.h5"), os.path.join(grid_out, f"{name}.h5")))

    print(f"{f'against {test} truth':<38}{'PCC-50':>9}{'mean r':>9}{'MSE':>9}{'agreement':>11}{'grid spots/s':>14}")
    for label, spot_file, grid_file in rows:
        with h5py.File(spot_file, "r") as f:
            spot_pred = f["pred"][()][on_grid]
        with h5py.File(grid_file, "r") as f:
            grid_all, secs = f["pred"][()], f.attrs["seconds"]
        grid_pred = np.stack([grid_all[b].mean(0) for b, keep in zip(pick, on_grid) if keep])
        agree = np.nanmedian(pearson_per_gene(spot_pred, grid_pred))  # per-gene r across spots, grid vs spot mode
        for mode, pred in (("spot mode", spot_pred), ("image path (grid)", grid_pred)):
            r = pearson_per_gene(truth[on_grid], pred)
            print(f"{label + ', ' + mode:<38}{top_k_mean(r, 50):>9.3f}{np.nanmean(r):>9.3f}"
                  f"{((truth[on_grid] - pred) ** 2).mean():>9.3f}"
                  + (f"{agree:>11.3f}{len(grid_px) / secs:>14.1f}" if mode != "spot mode" else ""))
    train_mean = np.concatenate([h5py.File(os.path.join(data, "slices", f"{s}.h5"), "r")["expr"][()]
                                 for s in ("C2", "C3", "C4", "C5", "C6") if s != test]).mean(0)
    print(f"{'training mean':<38}{'–':>9}{'–':>9}{((truth[on_grid] - train_mean) ** 2).mean():>9.3f}")
    print("(agreement: median over genes of the per-gene r across those spots between the grid's prediction (the grid "
          "point's, or the mean of the spot's bins) and the spot mode's;"
          " grid spots/s: sample.py's sampling, baselines.py's fit and prediction together)")


if __name__ == "__main__":
    main()
