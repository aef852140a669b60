"""Forward time and memory of the HINGE model on CPU, fp32 and bf16, and sampler throughput at K = 5 vs 50.

    python bench/model_bench.py [--presets small,cellfm-80m] [--batch 32] [--genes 300]
Each measurement runs in a fresh process so that its peak RSS is its own.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(preset, batch, genes, amp, what, K=5):
    import torch
    import model as M
    torch.manual_seed(0)
    cfg = M.make_config(preset, n_genes=genes, hist_dim=1536)
    net = M.Hinge(cfg, torch.arange(1, genes + 1)).eval()
    hist = torch.randn(batch, 1536)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        if what == "forward":
            x, vis, t = torch.rand(batch, genes) * 5, torch.rand(batch, genes) > 0.5, torch.full((batch,), 25)
            h = net.embed_histology(hist)
            net(x, vis, t, vis, h)                       # warm-up
            t0 = time.time()
            net(x, vis, t, vis, h)
            return time.time() - t0
        d = M.MaskedDiffusion(genes, 50)
        M.generate(net, d, hist, 1)                      # warm-up at the measured batch size
        best = float("inf")
        for _ in range(2):                               # best of two: less noise from the shared machine
            t0 = time.time()
            M.generate(net, d, hist, K)
            best = min(best, time.time() - t0)
        return batch / best


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":      # child process: one measurement, printed as JSON
        preset, batch, genes, amp, what, K = json.loads(sys.argv[2])
        value = measure(preset, batch, genes, amp, what, K)
        print(json.dumps({"value": value, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
        sys.exit()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,cellfm-80m")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--genes", type=int, default=300)
    p.add_argument("--sample-spots", type=int, default=128, help="spots for the sampler throughput (default 128)")
    a = p.parse_args()

    def one(*args):
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"forward pass, batch {a.batch}, {a.genes} genes, CPU ({os.cpu_count()} cores)")
    for preset in a.presets.split(","):
        for amp in (False, True):
            r = one(preset, a.batch, a.genes, amp, "forward", 0)
            print(f"  {preset:<12} {'bf16' if amp else 'fp32'}: {r['value'] * 1000:8.0f} ms   peak RSS {r['rss_gb']:.2f} GB")
    print(f"sampler, {a.sample_spots} spots, 1 sample, fp32")
    for preset in a.presets.split(",")[:1]:
        k5, k50 = (one(preset, a.sample_spots, a.genes, False, "sample", K)["value"] for K in (5, 50))
        print(f"  {preset:<12} K=5: {k5:7.1f} spots/s   K=50: {k50:7.1f} spots/s   ratio {k5 / k50:.1f}x (target >= 8x)")
