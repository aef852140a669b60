"""Forward time and memory of the HINGE model on CPU, fp32 and bf16 (sampler throughput: bench/speed.py).

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


def measure(preset, batch, genes, amp):
    import torch
    import model as M
    torch.manual_seed(0)
    cfg = M.make_config(preset, n_genes=genes, hist_dim=1536)
    net = M.Hinge(cfg, torch.arange(1, genes + 1)).eval()
    hist = torch.randn(batch, 1536)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        x, vis, t = torch.rand(batch, genes) * 5, torch.rand(batch, genes) > 0.5, torch.full((batch,), 25)
        h = net.embed_histology(hist)
        net(x, vis, t, vis, h)                           # warm-up
        t0 = time.time()
        net(x, vis, t, vis, h)
        return time.time() - t0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":      # child process: one measurement, printed as JSON
        value = measure(*json.loads(sys.argv[2]))
        print(json.dumps({"value": value, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))
        sys.exit()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,cellfm-80m")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--genes", type=int, default=300)
    a = p.parse_args()

    def one(*args):
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"forward pass, batch {a.batch}, {a.genes} genes, CPU ({os.cpu_count()} cores)")
    for preset in a.presets.split(","):
        for amp in (False, True):
            r = one(preset, a.batch, a.genes, amp)
            print(f"  {preset:<12} {'bf16' if amp else 'fp32'}: {r['value'] * 1000:8.0f} ms   peak RSS {r['rss_gb']:.2f} GB")
