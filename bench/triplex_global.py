"""TRIPLEX's global branch on a whole slide, where each bin attends to every other bin: its time, measured
where it runs in minutes and projected where it runs for hours.

    python bench/triplex_global.py --bins 45456,600536 --check 45456 --wsi runs/wsi_bench

A block's self-attention over N tokens costs N times one query's attention over the N keys. So the
script times each block of the branch for --queries queries over all N keys, scales that by N / queries,
and adds the APEG step, timed whole. At --check bins the whole branch is timed too, to test the
projection. With --wsi, a bin count that bench/wsi_bench.py measured with --peers triplex
(bins8_*/stages.json) also gets a projection of the whole peer: the rest of its time (fit,
neighbour and fusion branches) scaled linearly from the largest measured count.
"""
import argparse
import glob
import json
import os
import sys
import time

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from peers.triplex import SIZES, APEG, TriplexNet  # noqa: E402


def seconds(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def square_grid(n):
    """Array (row, col) of n bins filling a square, as Visium HD's bins do."""
    side = int(np.ceil(np.sqrt(n)))
    return np.stack(np.divmod(np.arange(n), side), 1)


@torch.no_grad()
def projected(net, n, queries):
    """Seconds of net.encode_global on n tokens: each block as `queries` queries over all n keys, times
    n / queries, plus APEG on all n."""
    x = torch.randn(1, n, net.global_norm.normalized_shape[0])
    q = min(queries, n)
    blocks = [net.global1, *net.global2]
    attend = sum(seconds(lambda: blk(x[:, :q], kv=x)) for blk in blocks) * n / q
    cells = APEG.cells(square_grid(n))
    return attend + seconds(lambda: net.apeg(x[0], cells))


@torch.no_grad()
def whole(net, n):
    x = torch.randn(n, net.global_norm.normalized_shape[0])
    cells = APEG.cells(square_grid(n))
    return seconds(lambda: net.encode_global(x, cells))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bins", default="45456,600536", help="bin counts to project (comma-separated)")
    p.add_argument("--check", type=int, default=45456, help="also time the whole branch at this count (0: none)")
    p.add_argument("--queries", type=int, default=4000, help="queries timed per block (default 4000)")
    p.add_argument("--size", choices=["cpu", "paper"], default="cpu", help="baselines.py --size (default cpu)")
    p.add_argument("--wsi", help="bench/wsi_bench.py's --out, to project the whole peer from its measurements")
    a = p.parse_args()
    torch.manual_seed(0)
    net = TriplexNet(74, 300, **SIZES[a.size]).eval()    # stain features, 300 genes: as bench/wsi_bench.py
    print(f"TRIPLEX --size {a.size}, global branch: {1 + len(net.global2)} blocks, width "
          f"{net.global_norm.normalized_shape[0]}; torch threads {torch.get_num_threads()}")
    if a.check:
        w, pr = whole(net, a.check), projected(net, a.check, a.queries)
        print(f"{a.check} bins: whole branch {w:.1f} s, projected {pr:.1f} s ({pr / w:.2f}x)")
    peer = {}
    if a.wsi:                                            # bins -> seconds of `peer triplex` in wsi_bench's records
        for path in glob.glob(os.path.join(a.wsi, "bins*_*", "stages.json")):
            rec = json.load(open(path)).get(f"peer triplex stain{' paper' * (a.size == 'paper')}")
            if rec and not rec.get("oom"):
                with h5py.File(os.path.join(os.path.dirname(path), "slices", "slide.h5"), "r") as f:
                    peer[len(f["barcode"])] = rec["secs"]
    for n in map(int, a.bins.split(",")):
        g = projected(net, n, a.queries)
        line = f"{n} bins: global branch projected {g:.0f} s ({g / 3600:.2f} h)"
        if peer:                                         # the rest of the largest measured run, scaled linearly
            m = max(peer)
            rest = (peer[m] - projected(net, m, a.queries)) * n / m
            line += f"; whole peer {rest + g:.0f} s ({(rest + g) / 3600:.2f} h) from its {peer[m]:.0f} s at {m} bins"
        print(line, flush=True)


if __name__ == "__main__":
    main()
