"""Stage 4: generate expression for slices with a step budget K (the paper's sampler, Sec. 3).

    python sample.py --run runs/demo1 --data data/demo --steps 5 --samples 5
    python sample.py --run runs/demo1 --data data/slides --slices my_slide      # a slide without spatial data
    torchrun --nproc_per_node 4 sample.py --run-dir ... --data ...               # spots shared between processes

Writes <run>/pred/<slice>.h5: `pred` [N, G] (mean over the S samples), `std` [N, G] (their spread,
the prediction's uncertainty), `barcode`, `genes`, and on request `samples` float16 [S, N, G] and
`steps` [R, N, G] (x̂0 at the recorded steps); beside it <slice>.h5ad, the same prediction as an
AnnData file that scanpy and squidpy open (`scanpy.pl.spatial(adata, color=GENE)`).
Slices need features, not expression: genes come from the checkpoint. Spots are processed in
batches and streamed to disk, so memory does not grow with N. Each batch draws its randomness
from (--seed, its first row), so the output is the same for any number of processes.
"""
import argparse
import glob
import os
import sys
import time

import h5py
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
from common import (UserError, atomic_h5, existing_slice, init_distributed, open_features, read_slice, run, str_array,
                    write_anndata)


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


def check_slice(data, name, ck, feats, hist_dim):
    """The slice's genes (when it has any) and features must be the checkpoint's."""
    with h5py.File(existing_slice(data, name), "r") as f:
        genes = [g.decode() for g in f["genes"][()]] if "genes" in f else None
        um, trained = f.attrs.get("pixel_size_um"), ck.get("pixel_size_um")
    if um and trained and max(um / trained, trained / um) > 1.5:  # patches are native pixels: the field of view differs
        print(f"warning: slice {name} is at {um:.2f} µm/px but the run was trained on slides at {trained:.2f} µm/px, so "
              f"each patch covers {um / trained:.2f}x the width of tissue it learned from; expect a loss", file=sys.stderr)
    if genes is not None and genes != ck["genes"]:
        raise UserError(f"slice {name} of {data} has other genes than the checkpoint's {len(ck['genes'])}; "
                        "prepare the data with the same gene selection as training")
    if feats.dim != hist_dim:
        raise UserError(f"features {'+'.join(ck['features'])} of slice {name} have dimension {feats.dim}, but the "
                        f"checkpoint expects {hist_dim}; extract the same encoders as in training")


def sample_batches(f, starts, net, diffusion, feats, ck, a, dev, record):
    """Generate the batches beginning at `starts` into the open prediction file f (other rows stay empty)."""
    mu, sd = torch.from_numpy(ck["feat_mean"]).to(dev), torch.from_numpy(ck["feat_std"]).to(dev)
    for b in tqdm(starts, desc=f"sample {os.path.basename(f.filename).split('.')[0]}", unit="batch"):
        gen = torch.Generator(dev).manual_seed(a.seed * 1_000_003 + b)  # per batch: independent of the process split
        h = (torch.from_numpy(feats.read(b, b + a.batch_size)).to(dev) - mu) / sd
        with torch.autocast(dev.type, torch.bfloat16, enabled=a.amp):
            mean, smp, rec = M.generate(net, diffusion, h, a.steps, a.samples, gen, record)
        f["pred"][b:b + len(h)] = mean.cpu().numpy()
        f["std"][b:b + len(h)] = smp.std(0, correction=1 if a.samples > 1 else 0).cpu().numpy()
        if a.save_samples:
            f["samples"][:, b:b + len(h)] = smp.cpu().numpy().astype(np.float16)
        for i, k in enumerate(record):
            f["steps"][i, b:b + len(h)] = rec[k].cpu().numpy()


def create_outputs(f, N, G, a, record):
    rows = min(a.batch_size, N)                          # one chunk per batch: a batch is one write
    f.create_dataset("pred", (N, G), np.float32, chunks=(rows, G))
    f.create_dataset("std", (N, G), np.float32, chunks=(rows, G))
    if a.save_samples:
        f.create_dataset("samples", (a.samples, N, G), np.float16, chunks=(1, rows, G))
    if record:
        f.create_dataset("steps", (len(record), N, G), np.float32, chunks=(1, rows, G))


def merge_parts(f, parts, starts, batch_size):
    """Copy each batch from the process that generated it (batch i: process i mod world)."""
    srcs = [h5py.File(p, "r") for p in parts]
    for i, b in enumerate(starts):
        src = srcs[i % len(srcs)]
        for key in ("pred", "std"):
            f[key][b:b + batch_size] = src[key][b:b + batch_size]
        for key in ("samples", "steps"):
            if key in src:
                f[key][:, b:b + batch_size] = src[key][:, b:b + batch_size]
    for s in srcs:
        s.close()


def sample_sharded(dst, name, job, rank, world, N, G, t0):
    """Under torchrun: each process generates every world-th batch into its part file, then process 0
    merges the parts into `dst` (the same rows one process would write) and removes them."""
    net, diffusion, feats, ck, a, dev, record = job
    starts = list(range(0, N, a.batch_size))
    if rank == 0:                                        # parts an interrupted run left behind
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        for stale in glob.glob(glob.escape(dst) + ".part*"):
            os.remove(stale)
    dist.barrier()
    with h5py.File(f"{dst}.part{rank}", "w") as f:       # this process's batches; the other rows stay unwritten
        create_outputs(f, N, G, a, record)
        sample_batches(f, starts[rank::world], *job)
    dist.barrier()
    if rank == 0:
        parts = [f"{dst}.part{r}" for r in range(world)]
        with atomic_h5(dst) as f:
            create_outputs(f, N, G, a, record)
            merge_parts(f, parts, starts, a.batch_size)
            finish(f, name, a, ck, diffusion, record, N, t0)
        for p in parts:
            os.remove(p)
    dist.barrier()


def finish(f, name, a, ck, diffusion, record, N, t0):
    """Spot ids, genes and the run's settings, once every row is written."""
    secs = time.time() - t0
    f["barcode"], f["genes"] = read_slice(a.data, name, ("barcode",))["barcode"], str_array(ck["genes"])
    if record:
        f["recorded_steps"] = np.array(record, np.int32)
        f["recorded_t"] = np.array([M.step_times(diffusion.T, a.steps)[k] for k in record], np.int32)
    f.attrs.update(K=a.steps, T=diffusion.T, n_samples=a.samples, seed=a.seed, seconds=secs, spots_per_s=N / secs,
                   checkpoint=os.path.abspath(os.path.join(a.run, a.checkpoint)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder of train.py (under torchrun write --run-dir: torchrun reads --run as its --run-path)")
    p.add_argument("--data", required=True, help="folder written by prepare_data.py (with features/)")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint in --run (default best.pt)")
    p.add_argument("--slices", help="slices to generate (comma-separated; default the run's test slice)")
    p.add_argument("--steps", type=int, default=5, help="step budget K, 1..T (default 5)")
    p.add_argument("--samples", type=int, default=5, help="samples per spot: their mean is the prediction, their "
                                                          "spread its uncertainty (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the gene orders and fill noise (default 0)")
    p.add_argument("--record-steps", help="store x̂0 at these step indices (comma-separated, or 'all')")
    p.add_argument("--save-samples", action="store_true", help="also store every sample (float16)")
    p.add_argument("--batch-size", type=int,
                   help="spots per batch (default 32 on CPU, where larger batches fall out of cache and run slower; "
                        "256 on a GPU)")
    p.add_argument("--out", help="prediction folder (default <run>/pred)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs; slow on CPUs without bf16 units)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
    a = p.parse_args()

    rank, world, a.device = init_distributed(a.device)
    dev = torch.device(a.device)
    a.batch_size = a.batch_size or (256 if dev.type == "cuda" else 32)
    net, diffusion, ck = load_run(os.path.join(a.run, a.checkpoint), dev)
    if not 1 <= a.steps <= diffusion.T:
        raise UserError(f"--steps {a.steps}: the step budget K must be between 1 and T={diffusion.T}")
    if a.samples < 1:
        raise UserError(f"--samples {a.samples}: at least one sample per spot")
    record = parse_record(a.record_steps, a.steps)
    out_dir = a.out or os.path.join(a.run, "pred")
    if not (a.slices or ck["test_slice"]):
        raise UserError(f"{a.run}: this run has no test slice (an imported checkpoint); name the slices with --slices")
    names = a.slices.split(",") if a.slices else [ck["test_slice"]]
    G = net.cfg.n_genes
    for name in names:
        dst = os.path.join(out_dir, f"{name}.h5")
        if os.path.isfile(dst) and not a.overwrite:
            if os.path.isfile(dst + "ad"):
                raise UserError(f"{dst} exists; pass --overwrite to replace it or choose another --out")
            if rank == 0:                                # sampled, but interrupted before its AnnData twin
                write_anndata(dst, a.data)
            continue
        feats = open_features(a.data, ck["features"], name, ck.get("context"))
        check_slice(a.data, name, ck, feats, net.cfg.hist_dim)
        N, t0 = feats.n, time.time()
        job = (net, diffusion, feats, ck, a, dev, record)
        if world == 1:
            with atomic_h5(dst) as f:
                create_outputs(f, N, G, a, record)
                sample_batches(f, list(range(0, N, a.batch_size)), *job)
                finish(f, name, a, ck, diffusion, record, N, t0)
        else:
            sample_sharded(dst, name, job, rank, world, N, G, t0)
        feats.close()
        if rank == 0:
            write_anndata(dst, a.data)
            secs = time.time() - t0
            print(f"{name}: {N} spots in {secs:.1f}s ({N / secs:.0f} spots/s, K={a.steps}, S={a.samples}"
                  f"{f', {world} processes' if world > 1 else ''}) -> {dst}, {dst}ad")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
