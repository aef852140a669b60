"""TRIPLEX's global branch on a whole slide, where each bin attends to every other bin: its time, measured
where it runs in minutes and projected where it runs for hours.

    OMP_NUM_THREADS=1 python bench/triplex_global.py --bins 45456,600536 --check 45456

A block's self-attention over N tokens costs N times one query's attention over the N keys. So the
script times each block of the branch for --queries queries over all N keys, scales that by N / queries,
and adds the APEG step, timed whole. At --check bins the whole branch is timed too, to test the
projection. The branch is a lower bound on the whole peer's time: its fit and its neighbour and
fusion branches grow linearly with the bins.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from peers.triplex import SIZES, APEG, TriplexNet  # noqa: E402
from runtime import synced_seconds  # noqa: E402

CPU = torch.device("cpu")


def square_cells(n):
    """APEG's cells of n bins filling a square, as Visium HD's bins do, as tensors (as peers/triplex.py keeps them)."""
    side = int(np.ceil(np.sqrt(n)))
    inverse, nb, C = APEG.cells(np.stack(np.divmod(np.arange(n), side), 1))
    return torch.from_numpy(inverse), torch.from_numpy(nb), C


@torch.no_grad()
def projected(net, n, queries):
    """Seconds of net.encode_global on n tokens: each block as `queries` queries over all n keys, times
    n / queries, plus APEG on all n."""
    x = torch.randn(1, n, net.global_norm.normalized_shape[0])
    q = min(queries, n)
    blocks = [net.global1, *net.global2]
    attend = sum(synced_seconds(CPU, lambda: blk(x[:, :q], kv=x)) for blk in blocks) * n / q
    cells = square_cells(n)
    return attend + synced_seconds(CPU, lambda: net.apeg(x[0], cells))


@torch.no_grad()
def whole(net, n):
    x = torch.randn(n, net.global_norm.normalized_shape[0])
    cells = square_cells(n)
    return synced_seconds(CPU, lambda: net.encode_global(x, cells))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bins", default="45456,600536", help="bin counts to project (comma-separated)")
    p.add_argument("--check", type=int, default=45456, help="also time the whole branch at this count (0: none)")
    p.add_argument("--queries", type=int, default=4000, help="queries timed per block (default 4000)")
    p.add_argument("--size", choices=["cpu", "paper"], default="cpu", help="baselines.py --size (default cpu)")
    a = p.parse_args()
    torch.manual_seed(0)
    net = TriplexNet(74, 300, **SIZES[a.size]).eval()    # stain features, 300 genes: as bench/wsi_bench.py
    print(f"TRIPLEX --size {a.size}, global branch: {1 + len(net.global2)} blocks, width "
          f"{net.global_norm.normalized_shape[0]}; torch threads {torch.get_num_threads()}")
    if a.check:
        w, pr = whole(net, a.check), projected(net, a.check, a.queries)
        print(f"{a.check} bins: whole branch {w:.1f} s, projected {pr:.1f} s ({pr / w:.2f}x)")
    for n in map(int, a.bins.split(",")):
        g = projected(net, n, a.queries)
        print(f"{n} bins: global branch projected {g:.0f} s ({g / 3600:.2f} h)", flush=True)


if __name__ == "__main__":
    main()
