"""sample.py throughput and peak memory against the number of spots, on synthetic features.

    python bench/sample_bench.py [--spots 1000,10000,50000] [--preset small] [--steps 1]
A fresh `small` model (random conditioning) is written as a train.py checkpoint; each size runs
sample.py in its own process. Targets: time linear in spots, peak memory at 50k
within 1.5x of 1k. K defaults to 1 so that 50k spots finish in minutes on 2 CPU cores; the
step count scales time, not memory.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--spots", default="1000,10000,50000")
p.add_argument("--preset", default="small")
p.add_argument("--steps", type=int, default=1)
p.add_argument("--genes", type=int, default=300)
p.add_argument("--dim", type=int, default=1536, help="feature dimension (UNI + CONCH)")
a = p.parse_args()

G, D = a.genes, a.dim
genes = [f"G{i}" for i in range(G)]
cfg = M.make_config(a.preset, vocab=G, n_genes=G, hist_dim=D)
net = M.Hinge(cfg, np.arange(1, G + 1))
rng = np.random.default_rng(0)
with tempfile.TemporaryDirectory() as tmp:
    run = os.path.join(tmp, "run")
    os.makedirs(run)
    M.save_run(os.path.join(run, "best.pt"), net, genes, ["synthetic"], np.zeros(D), np.ones(D), test_slice="s")
    print(f"sample.py, preset {a.preset}, K={a.steps}, 1 sample, {G} genes, {D}-d features")
    results = []
    for n in map(int, a.spots.split(",")):
        data = os.path.join(tmp, f"data{n}")
        os.makedirs(os.path.join(data, "slices")); os.makedirs(os.path.join(data, "features", "synthetic"))
        bc = np.array([f"s{i}".encode() for i in range(n)])
        with h5py.File(os.path.join(data, "slices", "s.h5"), "w") as f:
            f["barcode"], f["genes"] = bc, np.array([g.encode() for g in genes])
        with h5py.File(os.path.join(data, "features", "synthetic", "s.h5"), "w") as f:
            f["barcode"] = bc
            f.create_dataset("embeddings", data=rng.standard_normal((n, D), dtype=np.float32))
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), "--run", run, "--data", data, "--steps",
                                 str(a.steps), "--samples", "1", "--out", os.path.join(tmp, f"pred{n}")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)         # this child's own peak RSS
        secs = time.time() - t0
        if status:
            sys.exit(f"sample.py failed on {n} spots")
        rss = usage.ru_maxrss / 2 ** 20
        results.append((n, secs, rss))
        print(f"  {n:>6} spots: {secs:7.1f} s  {n / secs:7.1f} spots/s  peak RSS {rss:.2f} GB")
    (n0, s0, r0), (n1, s1, r1) = results[0], results[-1]
    print(f"time x{s1 / s0:.1f} for spots x{n1 / n0:.0f}; peak memory x{r1 / r0:.2f} (target <= 1.5)")
