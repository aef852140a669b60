"""--context on a grid of Visium HD bins (docs/speed.md "--context on bins"): each bin's neighbourhood mean by
the FFT convolution of folds.lattice_sums against the spot-pair sparse matrix that other layouts use, side by
side, each in its own process for its peak memory.

    python bench/context_grid.py                          # 8 µm bins, 10k-600k, the Her2ST --context 8 radius
    python bench/context_grid.py --bins 10000,25000 --radius-um 335 --dim 74

The slide is a square of tissue with 20 % holes; features are random (the cost does not depend on them), 74-d
as the stain encoder's. The pair path runs only up to --pairs-up-to bins: beyond, its index arrays alone
outgrow the memory (N x the ~5,500 bins within 335 µm of 8 µm bins x 16 bytes).
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from folds import Context, Geometry, context_features, square_lattice  # noqa: E402


def slide(n, um):
    """About n bins of `um` µm on a square of tissue, 20 % of it holes."""
    side = int(np.ceil(np.sqrt(n / 0.8)))
    col, row = np.meshgrid(np.arange(side), np.arange(side))
    keep = np.random.default_rng(0).random(side * side) < 0.8
    return np.stack([col.ravel(), row.ravel()], 1)[keep][:n] * um


def one(path, n, um, radius, dim):
    """In a child process: one context computation; prints seconds."""
    xy = slide(n, um)
    H = np.random.default_rng(1).normal(size=(len(xy), dim)).astype(np.float32)
    if path == "pairs":                                  # jitter far below a bin: no longer a lattice, same pairs
        xy = xy + np.random.default_rng(2).uniform(-0.1, 0.1, xy.shape) * um
        assert square_lattice(xy) is None
    t = time.perf_counter()
    context_features(H, Geometry(xy, "um", um, 224.0), Context(8, radius, radius / um), "bench")
    print(f"{time.perf_counter() - t:.2f}")


def measure(path, n, a):
    """-> (seconds, peak resident MB) of one run in a fresh process."""
    cmd = [sys.executable, __file__, "--one", path, "--bins", str(n), "--bin-um", str(a.bin_um),
           "--radius-um", str(a.radius_um), "--dim", str(a.dim)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, use = os.wait4(p.pid, 0)
    if status:
        return None, use.ru_maxrss / 1024
    return float(out.split()[-1]), use.ru_maxrss / 1024


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--bins", default="10000,25000,100000,600000")
p.add_argument("--bin-um", type=float, default=8.0)
p.add_argument("--radius-um", type=float, default=335.4, help="default: --context 8 on Her2ST's training slides")
p.add_argument("--dim", type=int, default=74)
p.add_argument("--pairs-up-to", type=int, default=25000)
p.add_argument("--one", choices=["lattice", "pairs"], help=argparse.SUPPRESS)
a = p.parse_args()
if a.one:
    one(a.one, int(a.bins), a.bin_um, a.radius_um, a.dim)
    sys.exit(0)
print(f"--context radius {a.radius_um:g} µm on {a.bin_um:g} µm bins "
      f"(~{np.pi * (a.radius_um / a.bin_um) ** 2:,.0f} bins within), {a.dim}-d features")
print("| bins | FFT s | FFT peak MB | pairs s | pairs peak MB | pairs / FFT time |\n|" + " --- |" * 6)
for n in map(int, a.bins.split(",")):
    ft, fm = measure("lattice", n, a)
    pt, pm = measure("pairs", n, a) if n <= a.pairs_up_to else (None, None)
    pair = "not run" if pm is None else ("failed" if pt is None else f"{pt:.2f}")
    print(f"| {n:,} | {ft:.2f} | {fm:,.0f} | {pair} | {'–' if pm is None else f'{pm:,.0f}'} | "
          f"{'–' if not pt else f'{pt / ft:.1f}x'} |")
print(f"(peak resident memory of each process, the Python interpreter and imports included: "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB here)")
