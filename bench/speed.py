"""Sampler throughput against the step budget K (docs/speed.md "Sampler speed"); with --cost, the
per-spot cost of two backbones at one K (the paper's Table S5: HINGE (scGPT) 548 spots/s against HINGE
(CellFM) 26.5 at K = 5, 20.7x).

    python bench/speed.py [--presets small,cellfm-80m] [--spots 64,4] [--genes 300] [--device cpu]
    python bench/speed.py --cost [--presets scgpt,cellfm-800m] [--spots 8,1] [--cost-k 5]

For each preset and K = 1, 5, 50: spots/s of the sampler as sample.py runs it (the histology
embedding computed once per spot); S = 1 sample, 1536-d features (UNI + CONCH), random weights
(speed does not depend on them). Prints the ratios K5/K50 and K1/K5 and, timed on its own (far
less noisy than whole samplers), the share of a step the histology embedding takes: what
computing it once per spot instead of at every step saves; then, K = 5, side by side, the sampler as it runs
(the last layer computing only the genes a step reveals) over the whole model at every step, and over encoding
every gene's value token afresh at every step instead of only the revealed genes'.
--cost: per spot, the matmul FLOPs of the whole sampler (torch's FlopCounterMode on one spot, attention
through its math kernel so that the counter sees it) and its seconds (n spots, after that counted run
as warm-up), each model built once; then the ratios of the second preset to the first.
"""
import argparse
import os
import sys

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from diffusion import MaskedDiffusion, generate  # noqa: E402
from checkpoints import build_model
from runtime import synced_seconds

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--presets", help="presets to compare (default small,cellfm-80m; --cost: scgpt,cellfm-800m)")
p.add_argument("--spots", help="spots per timed batch, per preset (the large model gets fewer on CPU; default 64,4; "
                               "--cost: 8,1)")
p.add_argument("--genes", type=int, default=300)
p.add_argument("--steps", default="1,5,50")
p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best kept)")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--cost", action="store_true",
               help="per-spot FLOPs and seconds of each preset at --cost-k, and their ratio")
p.add_argument("--cost-k", type=int, default=5, help="--cost: the step budget K (default 5, as Table S5)")
a = p.parse_args()
a.presets = a.presets or ("scgpt,cellfm-800m" if a.cost else "small,cellfm-80m")
a.spots = a.spots or ("8,1" if a.cost else "64,4")
dev = torch.device(a.device)


def spots_per_s(net, diffusion, hist, K, record=()):
    gen = torch.Generator(dev).manual_seed(0)
    return len(hist) / synced_seconds(dev, lambda: generate(net, diffusion, hist, K, 1, gen, record))


def gain(fast, slow, diffusion, hist, K=5):
    """Spots/s of the sampler on (model, recorded steps) `fast` over `slow`, best of --repeats each, alternating."""
    rates = {fast: [], slow: []}
    for _ in range(a.repeats):
        for setting in (fast, slow):
            rates[setting].append(spots_per_s(setting[0], diffusion, hist, K, setting[1]))
    return max(rates[fast]) / max(rates[slow])


@torch.no_grad()
def histology_share(net, diffusion, hist, repeats=20):
    """Best-of-N time of the histology embedding and of one sampler step (model forward) on the batch."""
    h = net.embed_histology(hist)
    ranks = diffusion.gene_ranks(len(hist), dev)
    t = torch.full((len(hist),), diffusion.T // 2, device=dev)
    x, vis = torch.randn(len(hist), diffusion.G, device=dev), diffusion.visible(ranks, t)
    embed = min(synced_seconds(dev, lambda: net.embed_histology(hist)) for _ in range(repeats))
    step = min(synced_seconds(dev, lambda: net(x, vis, t, diffusion.visible(ranks, t - 1), h)) for _ in range(repeats))
    return embed, step


def build(preset):
    """A preset with random weights and token ids 0..G-1 (scGPT) or 1..G (CellFM, 0 = padding)."""
    cfg = M.make_config(preset, n_genes=a.genes, hist_dim=1536)
    if cfg.backbone == "cellfm":                         # random weights: tiny's 63-gene demo vocabulary widened to G
        cfg.vocab = max(cfg.vocab, a.genes)
    return build_model(cfg, np.arange(a.genes) + (cfg.backbone == "cellfm")).to(dev).eval()


def per_spot_cost(preset, n, K):
    """(parameters, matmul FLOPs per spot, seconds per spot) of generate() at K steps, S = 1."""
    net, diffusion = build(preset), MaskedDiffusion(a.genes)
    hist = torch.randn(n, 1536, device=dev)
    gen = torch.Generator(dev).manual_seed(0)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        generate(net, diffusion, hist[:1], K, 1, gen)
    secs = synced_seconds(dev, lambda: generate(net, diffusion, hist, K, 1, gen)) / n
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops(), secs


def compare_cost():
    print(f"device {a.device}, {torch.get_num_threads()} threads, {a.genes} genes, K = {a.cost_k}, 1 sample per spot, "
          "random weights")
    print(f"{'preset':<14}{'parameters':>14}{'GFLOP/spot':>12}{'s/spot':>10}{'spots/s':>10}"
          "   (parameters with conditioning)")
    rows = []
    for preset, n in zip(a.presets.split(","), map(int, a.spots.split(","))):
        rows.append(per_spot_cost(preset, n, a.cost_k))
        params, flops, secs = rows[-1]
        print(f"{preset:<14}{params:>14,}{flops / 1e9:>12.1f}{secs:>10.3g}{1 / secs:>10.3g}   ({n} spots timed)")
    (_, f0, s0), (_, f1, s1) = rows[:2]
    fast, slow = a.presets.split(",")[:2]
    print(f"{slow} / {fast}: {f1 / f0:.1f}x the FLOPs, {s1 / s0:.1f}x the seconds per spot; the paper's Table S5: "
          f"548 / 26.5 spots/s = {547.97 / 26.46:.1f}x (A800, K = 5)")


if a.cost:
    compare_cost()
    sys.exit()

torch.manual_seed(0)
Ks = [int(k) for k in a.steps.split(",")]
print(f"device {a.device}, {torch.get_num_threads()} threads, {a.genes} genes, 1536-d features, 1 sample per spot")
print(f"{'preset':<12}{'K':>4}{'spots':>7}{'spots/s':>10}")
for preset, n in zip(a.presets.split(","), map(int, a.spots.split(","))):
    net = build(preset)
    diffusion = MaskedDiffusion(a.genes)
    hist = torch.randn(n, 1536, device=dev)
    spots_per_s(net, diffusion, hist[:2], 1)            # warm-up: allocator, kernels
    rate = {}
    for K in Ks:
        rate[K] = max(spots_per_s(net, diffusion, hist, K) for _ in range(a.repeats))
        print(f"{preset:<12}{K:>4}{n:>7}{rate[K]:>10.2f}")
    embed, step = histology_share(net, diffusion, hist)
    print(f"{preset}: histology embedding {1e3 * embed:.2f} ms, one step {1e3 * step:.1f} ms per batch of {n}: "
          f"computing it once per spot saves {100 * embed / (embed + step):.2f} % of each step")
    print(f"{preset}: computing only the revealed genes in the last layer: "
          f"{gain((net, ()), (net, tuple(range(5))), diffusion, hist):.2f}x the spots/s of the whole model at every "
          "step (K=5)")
    if {1, 5, 50} <= set(Ks):
        print(f"{preset}: K=5 is {rate[5] / rate[50]:.1f}x the spots/s of K=50 (target >= 8), "
              f"K=1 {rate[1] / rate[5]:.1f}x of K=5")
