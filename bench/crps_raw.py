"""Fair CRPS of stored samples, calibrated and as drawn, per method of a quality benchmark run (docs/results.md,
"Where HINGE wins and loses"). sample.py and baselines.py move each sample away from the prediction, the samples'
own mean, by the gene's calibration factor c. With S = 2 the fair CRPS of such a pair is
max(0, |m - y| - c·|x1 - x2| / 2), which falls however far the pair is pushed apart; that is why evaluate.py scores
the Gaussian of (pred, std) instead. The raw samples are independent draws, so their fair CRPS is the unbiased
one of what the method samples: the score of the samples' shape, beside evaluate.py's.

    python bench/crps_raw.py                                   # within patient C, the sampling methods
    python bench/crps_raw.py --table cross --methods hinge_gaussian_K5,gaussian_K50
"""
import argparse
import glob
import os
import sys

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from evaluate import crps_entries, load_pair  # noqa: E402
from scores import calibrate, crps_samples  # noqa: E402


def crps_of(path, data):
    """evaluate.py's CRPS, and the mean fair CRPS of the stored samples calibrated and raw, of one predicted slice
    -> (those three, S)."""
    p = load_pair(path, data)
    with h5py.File(path, "r") as f:
        samples, scale = f["samples"][()], f["calibration_scale"][()]
    raw = calibrate(p.pred, p.std, samples, 1 / scale)[1]   # the calibration's move, undone by its inverse factor
    return (crps_entries(p.truth, p.pred, p.std).mean(), crps_samples(p.truth, samples).mean(),
            crps_samples(p.truth, raw).mean(), len(samples))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/quality", help="bench/quality.sh's --out")
    ap.add_argument("--table", default="within", choices=["within", "cross"])
    ap.add_argument("--methods", default="gaussian_K50,hinge_gaussian_K5,stflow,knn")
    a = ap.parse_args()
    print(f"| method ({a.table}) | S | CRPS (evaluate.py) | fair CRPS, calibrated samples | fair CRPS, raw samples |\n"
          "| --- | --- | --- | --- | --- |")
    for m in a.methods.split(","):
        files = sorted(glob.glob(f"{a.out}/pred/{a.table}/{m}/*.h5") + glob.glob(f"{a.out}/pred/{a.table}/{m}@*/*.h5"))
        if not files:
            sys.exit(f"error: no predictions of {m} under {a.out}/pred/{a.table}")
        gauss, cal, raw, s = zip(*(crps_of(f, f"{a.out}/data") for f in files))
        S = f"{min(s)}" if min(s) == max(s) else f"{min(s)}–{max(s)}"   # kNN: k is chosen per fold
        print(f"| {m} | {S} | {np.mean(gauss):.3f} | {np.mean(cal):.3f} | {np.mean(raw):.3f} |")


if __name__ == "__main__":
    main()
