"""Sampler throughput against the step budget K (docs/benchmarks.md "Sampler speed").

    python bench/speed.py [--presets small,cellfm-80m] [--spots 64,4] [--genes 300] [--device cpu]

For each preset and K = 1, 5, 50: spots/s of the sampler as sample.py runs it (the histology
embedding computed once per spot); S = 1 sample, 1536-d features (UNI + CONCH), random weights
(speed does not depend on them). Prints the ratios K5/K50 and K1/K5 and, timed on its own (far
less noisy than whole samplers), the share of a step the histology embedding takes: what
computing it once per spot instead of at every step saves.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--presets", default="small,cellfm-80m")
p.add_argument("--spots", default="64,4", help="spots per timed batch, per preset (the large model gets fewer on CPU)")
p.add_argument("--genes", type=int, default=300)
p.add_argument("--steps", default="1,5,50")
p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best kept)")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
a = p.parse_args()
dev = torch.device(a.device)


def seconds(f):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    f()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def spots_per_s(net, diffusion, hist, K):
    gen = torch.Generator(dev).manual_seed(0)
    return len(hist) / seconds(lambda: M.generate(net, diffusion, hist, K, 1, gen))


@torch.no_grad()
def histology_share(net, diffusion, hist, repeats=20):
    """Best-of-N time of the histology embedding and of one sampler step (model forward) on the batch."""
    h = net.embed_histology(hist)
    ranks = diffusion.gene_ranks(len(hist), dev)
    t = torch.full((len(hist),), diffusion.T // 2, device=dev)
    x, vis = torch.randn(len(hist), diffusion.G, device=dev), diffusion.visible(ranks, t)
    embed = min(seconds(lambda: net.embed_histology(hist)) for _ in range(repeats))
    step = min(seconds(lambda: net(x, vis, t, diffusion.visible(ranks, t - 1), h)) for _ in range(repeats))
    return embed, step


torch.manual_seed(0)
Ks = [int(k) for k in a.steps.split(",")]
print(f"device {a.device}, {torch.get_num_threads()} threads, {a.genes} genes, 1536-d features, 1 sample per spot")
print(f"{'preset':<12}{'K':>4}{'spots':>7}{'spots/s':>10}")
for preset, n in zip(a.presets.split(","), map(int, a.spots.split(","))):
    cfg = M.make_config(preset, n_genes=a.genes, hist_dim=1536)
    net = M.Hinge(cfg, torch.arange(1, a.genes + 1)).to(dev).eval()
    diffusion = M.MaskedDiffusion(a.genes)
    hist = torch.randn(n, 1536, device=dev)
    spots_per_s(net, diffusion, hist[:2], 1)            # warm-up: allocator, kernels
    rate = {}
    for K in Ks:
        rate[K] = max(spots_per_s(net, diffusion, hist, K) for _ in range(a.repeats))
        print(f"{preset:<12}{K:>4}{n:>7}{rate[K]:>10.2f}")
    embed, step = histology_share(net, diffusion, hist)
    print(f"{preset}: histology embedding {1e3 * embed:.2f} ms, one step {1e3 * step:.1f} ms per batch of {n}: computing "
          f"it once per spot saves {100 * embed / (embed + step):.2f} % of each step")
    if {1, 5, 50} <= set(Ks):
        print(f"{preset}: K=5 is {rate[5] / rate[50]:.1f}x the spots/s of K=50 (target >= 8), K=1 {rate[1] / rate[5]:.1f}x of K=5")
