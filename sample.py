"""Stage 4: generate expression for held-out slices with a step budget K (DESIGN.md §3).

    python sample.py --run runs/demo1 --data data/demo --steps 5 --samples 5

Writes <run>/pred/<slice>.h5: `pred` [N, G] (mean over samples), `barcode`, `genes`, and on
request `samples` float16 [S, N, G] and `steps` [R, N, G] (x̂0 at the recorded steps).
Spots are processed in batches and streamed to disk, so memory does not grow with N.
"""
import argparse
import os
import time

import h5py
import numpy as np
import torch
from tqdm import tqdm

import model as M
from common import Features, UserError, atomic_h5, read_slice, run, str_array


def load_run(path, device):
    """A train.py checkpoint -> (model, diffusion, checkpoint dict)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found; train first (train.py --out {os.path.dirname(path)})")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = M.Config(**ck["config"])
    net = M.Hinge(cfg, ck["gene_tokens"])
    net.load_state_dict(ck["model"])
    net.to(device).eval()
    diffusion = M.make_diffusion(ck["objective"], cfg.n_genes, ck["T"], ck["schedule"], ck["fill"])
    return net, diffusion, ck


def parse_record(spec, K):
    if not spec:
        return ()
    steps = range(K) if spec == "all" else [int(s) for s in spec.split(",")]
    if any(not 0 <= k < K for k in steps):
        raise UserError(f"--record-steps {spec}: step indices must lie in 0..{K - 1} (or 'all')")
    return tuple(steps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder of train.py")
    p.add_argument("--data", required=True, help="folder written by prepare_data.py (with features/)")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint in --run (default best.pt)")
    p.add_argument("--slices", help="slices to generate (comma-separated; default the run's test slice)")
    p.add_argument("--steps", type=int, default=5, help="step budget K, 1..T (default 5)")
    p.add_argument("--samples", type=int, default=5, help="samples per spot, averaged (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record-steps", help="store x̂0 at these step indices (comma-separated, or 'all')")
    p.add_argument("--save-samples", action="store_true", help="also store every sample (float16)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="spots per batch (default 32: on CPU larger batches fall out of cache and run slower; raise it on a GPU)")
    p.add_argument("--out", help="prediction folder (default <run>/pred)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
    a = p.parse_args()

    dev = torch.device(a.device)
    net, diffusion, ck = load_run(os.path.join(a.run, a.checkpoint), dev)
    if not 1 <= a.steps <= diffusion.T:
        raise UserError(f"--steps {a.steps}: the step budget K must be between 1 and T={diffusion.T}")
    if a.samples < 1:
        raise UserError(f"--samples {a.samples}: at least one sample per spot")
    record = parse_record(a.record_steps, a.steps)
    out_dir = a.out or os.path.join(a.run, "pred")
    names = a.slices.split(",") if a.slices else [ck["test_slice"]]
    G = net.cfg.n_genes
    mu, sd = torch.from_numpy(ck["feat_mean"]).to(dev), torch.from_numpy(ck["feat_std"]).to(dev)
    gen = torch.Generator(dev).manual_seed(a.seed)
    for name in names:
        dst = os.path.join(out_dir, f"{name}.h5")
        if os.path.isfile(dst) and not a.overwrite:
            raise UserError(f"{dst} exists; pass --overwrite to replace it or choose another --out")
        s = read_slice(a.data, name, ("genes", "barcode"))
        if [g.decode() for g in s["genes"]] != ck["genes"]:
            raise UserError(f"slice {name} of {a.data} has other genes than the checkpoint's {len(ck['genes'])}; "
                            "prepare the data with the same gene selection as training")
        feats = Features(a.data, ck["features"], name)
        if feats.dim != net.cfg.hist_dim:
            raise UserError(f"features {'+'.join(ck['features'])} of slice {name} have dimension {feats.dim}, but the "
                            f"checkpoint expects {net.cfg.hist_dim}; extract the same encoders as in training")
        N, t0 = feats.n, time.time()
        with atomic_h5(dst) as f:
            pred = f.create_dataset("pred", (N, G), np.float32)
            samples = f.create_dataset("samples", (a.samples, N, G), np.float16) if a.save_samples else None
            steps = f.create_dataset("steps", (len(record), N, G), np.float32) if record else None
            for b in tqdm(range(0, N, a.batch_size), desc=f"sample {name}", unit="batch"):
                h = (torch.from_numpy(feats.read(b, b + a.batch_size)).to(dev) - mu) / sd
                with torch.autocast(dev.type, torch.bfloat16, enabled=a.amp):
                    mean, smp, rec = M.generate(net, diffusion, h, a.steps, a.samples, gen, record)
                pred[b:b + len(h)] = mean.cpu().numpy()
                if samples is not None:
                    samples[:, b:b + len(h)] = smp.cpu().numpy().astype(np.float16)
                for i, k in enumerate(record):
                    steps[i, b:b + len(h)] = rec[k].cpu().numpy()
            secs = time.time() - t0
            f["barcode"], f["genes"] = s["barcode"], str_array(ck["genes"])
            if record:
                f["recorded_steps"] = np.array(record, np.int32)
                f["recorded_t"] = np.array([M.step_times(diffusion.T, a.steps)[k] for k in record], np.int32)
            f.attrs.update(K=a.steps, T=diffusion.T, n_samples=a.samples, seed=a.seed, seconds=secs,
                           spots_per_s=N / secs, checkpoint=os.path.abspath(os.path.join(a.run, a.checkpoint)))
        feats.close()
        print(f"{name}: {N} spots in {secs:.1f}s ({N / secs:.0f} spots/s, K={a.steps}, S={a.samples}) -> {dst}")


if __name__ == "__main__":
    run(main)
