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
from (--seed, its first row), so the output is the same for any number of processes, and a run that
was stopped continues where it stopped when the same command is run again (a multi-hour slide on a CPU).
"""
import argparse
import glob
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
from checkpoints import load_run, validation_space
from common import UserError, atomic_h5, existing_slice, read_slice, run, write_text
from diffusion import generate, generate_slide, step_times
from folds import open_features, slide_space
from predictions import PredictionFile, provenance, write_anndata
from runtime import add_runtime_args, init_distributed
from scores import calibrate, calibration_scale

PIECE_BATCHES = 64      # batches per piece file: a stopped run redoes at most one (about 40 s of `small` on a CPU)


@dataclass
class Job:
    """One slice to generate: the model, its run, the slice's features and the sampling settings."""
    net: torch.nn.Module                                # model.Hinge or scgpt.ScGPT
    diffusion: object
    run: dict
    feats: object                                       # common.Features or ContextFeatures
    args: argparse.Namespace
    device: torch.device
    record: tuple
    scale: np.ndarray | None                             # per-gene calibration of the spread, or None
    space: M.SpotSpace | None = None                     # the slide with each spot's neighbours (--spatial runs)

    @property
    def joint(self):                                     # --spatial joint: the slide is generated in lockstep
        return self.net.cfg.spatial == "joint"


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
        print(f"warning: slice {name} is at {um:.2f} µm/px but the run was trained on slides at {trained:.2f} µm/px, "
              f"so each patch covers {um / trained:.2f}x the width of tissue it learned from; expect a loss",
              file=sys.stderr)
    if genes is not None and genes != ck["genes"]:
        raise UserError(f"slice {name} of {data} has other genes than the checkpoint's {len(ck['genes'])}; "
                        "prepare the data with the same gene selection as training")
    if feats.dim != hist_dim:
        raise UserError(f"features {'+'.join(ck['features'])} of slice {name} have dimension {feats.dim}, but the "
                        f"checkpoint expects {hist_dim}; extract the same encoders as in training")


def open_outputs(f, N, G, job):
    a = job.args                                         # one chunk per batch: a batch is one write
    return PredictionFile(f, N, G, a.batch_size, a.samples if a.save_samples else 0, len(job.record))


def standardise(job, feats):                             # raw features [n, D] -> standardised, on the device
    mu, sd = job.run["feat_mean"], job.run["feat_std"]
    return torch.from_numpy((feats - mu) / sd).float().to(job.device)


def summarise(smp):                                      # samples [S, n, G] -> mean, std over the samples, numpy
    return smp.mean(0).cpu().numpy(), smp.std(0, correction=1 if len(smp) > 1 else 0).cpu().numpy()


def generate_block(job, h, seed, record=(), around=None):
    """The S samples of a block of spots (standardised features [n, D], for a spatial run their surroundings)
    -> (mean, std, samples, recorded x̂0), numpy."""
    a, dev = job.args, job.device
    gen = torch.Generator(dev).manual_seed(seed)
    with torch.autocast(dev.type, torch.bfloat16, enabled=a.amp):
        _, smp, rec = generate(job.net, job.diffusion, h, a.steps, a.samples, gen, record, a.temperature, around)
    steps = np.stack([rec[k].cpu().numpy() for k in record]) if record else None
    return *summarise(smp.float()), smp.cpu().numpy(), steps


def generate_jointly(job, space, seed):
    """--spatial joint: the S samples of every spot of `space` (a model.SpotSpace), generated together in lockstep
    -> samples [S, N, G] float16 tensor."""
    a, dev = job.args, job.device
    gen = torch.Generator(dev).manual_seed(seed)

    def embed(b, e):
        return job.net.embed_histology(space.features[b:e], space.around(slice(b, e)))
    with torch.autocast(dev.type, torch.bfloat16, enabled=a.amp):
        return generate_slide(job.net, job.diffusion, embed, space, a.steps, a.samples, gen, a.temperature,
                              a.batch_size)


def validation_predictions(job):
    """Mean and spread of the run's validation spots, generated as the run generates a slide."""
    a, X = job.args, job.run["val_expr"]
    if job.net.cfg.spatial == "none":
        blocks = [generate_block(job, standardise(job, job.run["val_features"][b:b + a.batch_size]), -1 - b)
                  for b in range(0, len(X), a.batch_size)]
    else:
        space, scored = validation_space(job.run, job.device)
        if job.joint:                                    # the validation spots among their neighbours, jointly
            return summarise(generate_jointly(job, space, -1)[:, torch.from_numpy(scored)].float())
        rows = [torch.from_numpy(scored[b:b + a.batch_size]).to(job.device) for b in range(0, len(X), a.batch_size)]
        blocks = [generate_block(job, space.features[r], -1 - b * a.batch_size, around=space.around(r))
                  for b, r in enumerate(rows)]
    return np.concatenate([m for m, *_ in blocks]), np.concatenate([s for _, s, *_ in blocks])


def calibration(job):
    """Per gene, the factor on the spread that makes the central 50 % and 90 % intervals cover their share
    of the run's validation spots, sampled with the same K, S and temperature (one rule for every method)."""
    X = job.run["val_expr"]
    scale = calibration_scale(X, *validation_predictions(job))
    print(f"calibrated the spread on {len(X)} validation spots: scale median {np.median(scale):.2f} "
          f"(10-90 %: {np.percentile(scale, 10):.2f}-{np.percentile(scale, 90):.2f})")
    return scale


def piece_path(folder, i):
    return os.path.join(folder, f"piece{i:05d}.h5")


def settings_key(a, name, calibrated):
    """What a slice's generated rows depend on: a stopped run is continued only under the same key."""
    files = [os.path.join(a.run, a.checkpoint), existing_slice(a.data, name),
             *sorted(glob.glob(os.path.join(glob.escape(a.data), "features", "*", f"{name}.h5")))]
    return json.dumps({"files": {os.path.abspath(p): [os.path.getsize(p), os.path.getmtime(p)] for p in files},
                       "device": torch.device(a.device).type, "calibrated": calibrated,
                       **{k: getattr(a, k) for k in ("steps", "samples", "temperature", "seed", "batch_size",
                                                     "save_samples", "record_steps", "amp")}}, sort_keys=True)


def open_partial(folder, key, name):
    """The folder of a slice's finished pieces -> seconds its earlier runs spent on them; a folder left by a run
    with other settings is emptied first."""
    keyfile = os.path.join(folder, "settings.json")
    if os.path.isdir(folder) and (not os.path.isfile(keyfile) or open(keyfile).read() != key):
        print(f"{name}: discarding {folder}, left by a stopped run with other settings")
        shutil.rmtree(folder)
    if not os.path.isdir(folder):
        os.makedirs(folder)
        write_text(keyfile, key)
    pieces = glob.glob(os.path.join(glob.escape(folder), "piece*.h5"))
    seconds = 0.0
    for p in pieces:
        with h5py.File(p, "r") as f:
            seconds += f.attrs["seconds"]
    if pieces:
        print(f"{name}: continuing a stopped run, {len(pieces)} pieces already in {folder}")
    return seconds


def sample_pieces(folder, pieces, job, N, G):
    """Generate each piece ({index: its batch starts}) into its own file in `folder`, renamed into place only when
    complete, so that a stopped run keeps every finished piece and loses at most the one it was writing."""
    a = job.args
    joint = generate_jointly(job, job.space, a.seed) if job.joint and pieces else None   # [S, N, G]
    bar = tqdm(total=sum(map(len, pieces.values())), desc=f"sample {os.path.basename(folder).split('.')[0]}",
               unit="batch")
    for i, starts in pieces.items():
        t0 = time.time()
        with atomic_h5(piece_path(folder, i)) as f:
            out = open_outputs(f, N, G, job)             # the slide's shape; only this piece's rows are written
            for b in starts:
                e = b + a.batch_size
                if joint is not None:
                    smp = joint[:, b:e].float()
                    mean, std, smp, steps = *summarise(smp), smp.numpy(), None
                else:                                    # per batch (--seed, first row): independent of the split
                    h, around = ((job.space.features[b:e], job.space.around(slice(b, e))) if job.space is not None
                                 else (standardise(job, job.feats.read(b, e)), None))
                    mean, std, smp, steps = generate_block(job, h, a.seed * 1_000_003 + b, job.record, around)
                if job.scale is not None:
                    std, smp = calibrate(mean, std, smp, job.scale)
                out.write(b, mean, std, smp if a.save_samples else None, steps)
                bar.update()
            f.attrs["seconds"] = time.time() - t0
    bar.close()


def merge_pieces(out, folder, pieces, batch_size):
    """Copy each piece's rows into the prediction file."""
    for i, starts in enumerate(pieces):
        rows = slice(starts[0], starts[-1] + batch_size)
        with h5py.File(piece_path(folder, i), "r") as src:
            out.write(rows.start, src["pred"][rows], src["std"][rows],
                      src["samples"][:, rows] if "samples" in src else None,
                      src["steps"][:, rows] if "steps" in src else None)


def sample_slice(dst, name, job, rank, world, N, G, t0):
    """Generate a slice in pieces of PIECE_BATCHES batches, kept in <dst>.partial/ until every piece is done;
    under torchrun each process generates every world-th missing piece. A stopped run started again with the
    same settings (any number of processes) generates only the missing pieces: the rows are the same, since
    each batch draws its randomness from (--seed, its first row). Process 0 then merges them into `dst`."""
    a, folder = job.args, dst + ".partial"
    starts = list(range(0, N, a.batch_size))
    pieces = [starts[i:i + PIECE_BATCHES] for i in range(0, len(starts), PIECE_BATCHES)]
    earlier = open_partial(folder, settings_key(a, name, job.scale is not None), name) if rank == 0 else 0.0
    if world > 1:
        dist.barrier()
    todo = [i for i in range(len(pieces)) if not os.path.isfile(piece_path(folder, i))]
    sample_pieces(folder, {i: pieces[i] for i in todo[rank::world]}, job, N, G)
    if world > 1:
        dist.barrier()
    if rank == 0:
        with atomic_h5(dst) as f:
            out = open_outputs(f, N, G, job)
            merge_pieces(out, folder, pieces, a.batch_size)
            finish(out, name, job, N, t0 - earlier)
        shutil.rmtree(folder)
    if world > 1:
        dist.barrier()
    return earlier


def finish(out, name, job, N, t0):
    """Spot ids, genes and the run's settings, once every row is written."""
    a, secs, run = job.args, time.time() - t0, job.run
    train = {"data": run["args"].get("data"), "slices": run["train_slices"], "imported_from": run.get("imported_from"),
             "genes_file": run["args"].get("genes")}
    if job.record:
        out.f["recorded_steps"] = np.array(job.record, np.int32)
        out.f["recorded_t"] = np.array([step_times(job.diffusion.T, a.steps)[k] for k in job.record], np.int32)
    if job.scale is not None:
        out.f["calibration_scale"] = job.scale.astype(np.float32)
    out.finish(read_slice(a.data, name, ("barcode",))["barcode"], job.run["genes"], K=a.steps, T=job.diffusion.T,
               n_samples=a.samples, seed=a.seed, seconds=secs, spots_per_s=N / secs, head=job.net.cfg.head,
               temperature=a.temperature, calibrated=job.scale is not None,
               checkpoint=os.path.abspath(os.path.join(a.run, a.checkpoint)), **provenance(a.data, name, train))


def check_temperature(temperature, head):
    """--temperature for the run's head: default 0.5 for a distribution, 0 (its value) for the point head."""
    if temperature is None:  # 0.5: chosen with the head on validation spots (docs/results.md "Choosing the head")
        return 0.0 if head == "point" else 0.5
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: a temperature is >= 0 (0 reveals the mean)")
    if head == "point" and temperature != 0:
        raise UserError(f"--temperature {temperature}: this run's head is point, a value with no distribution to draw "
                        "from; train with --head gaussian or bins")
    return temperature


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder of train.py (under torchrun write --run-dir: torchrun reads --run as its "
                        "--run-path)")
    p.add_argument("--data", required=True, help="folder written by prepare_data.py (with features/)")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint in --run (default best.pt)")
    p.add_argument("--slices", help="slices to generate (comma-separated; default the run's test slice)")
    p.add_argument("--steps", type=int, default=5, help="step budget K, 1..T (default 5)")
    p.add_argument("--samples", type=int, default=5, help="samples per spot: their mean is the prediction, their "
                                                          "spread its uncertainty (default 5)")
    p.add_argument("--temperature", type=float,
                   help="draw each revealed gene from the head's distribution at this temperature (default 0.5; 0 "
                        "reveals its mean); the point head has no distribution: 0 only")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction,
                   help="scale each gene's spread so that the 50 %% and 90 %% intervals cover their share of the run's "
                        "validation spots (default: when the run has them; --no-calibrate: the raw spread)")
    p.add_argument("--record-steps", help="store x̂0 at these step indices (comma-separated, or 'all')")
    p.add_argument("--save-samples", action="store_true", help="also store every sample (float16)")
    p.add_argument("--out", help="prediction folder (default <run>/pred)")
    p.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
    add_runtime_args(p, None, "spots per batch (default 32 on CPU, where larger batches fall out of cache and run "
                              "slower; 256 on a GPU)")
    return p.parse_args()


def main():
    a = parse_args()
    rank, world, a.device = init_distributed(a.device)
    dev = torch.device(a.device)
    a.batch_size = a.batch_size or (256 if dev.type == "cuda" else 32)
    net, diffusion, ck = load_run(os.path.join(a.run, a.checkpoint), dev)
    if not 1 <= a.steps <= diffusion.T:
        raise UserError(f"--steps {a.steps}: the step budget K must be between 1 and T={diffusion.T}")
    if a.samples < 1:
        raise UserError(f"--samples {a.samples}: at least one sample per spot")
    a.temperature = check_temperature(a.temperature, net.cfg.head)
    if a.calibrate and ck["val_expr"] is None:
        raise UserError(f"--calibrate: {a.run} holds no validation spots (an imported checkpoint); drop --calibrate")
    record = parse_record(a.record_steps, a.steps)
    if net.cfg.spatial == "joint" and (record or world > 1):
        raise UserError(f"{a.run} generates each slide jointly (--spatial joint), in one process and without "
                        f"recorded steps; drop {'--record-steps' if record else 'torchrun'}")
    out_dir = a.out or os.path.join(a.run, "pred")
    if not (a.slices or ck["test_slice"]):
        raise UserError(f"{a.run}: this run has no test slice (an imported checkpoint); name the slices with --slices")
    names = a.slices.split(",") if a.slices else [ck["test_slice"]]
    G, scale = net.cfg.n_genes, None
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
        job = Job(net, diffusion, ck, feats, a, dev, record, None)
        if net.cfg.spatial != "none":                    # the whole slide with each spot's neighbours, in memory
            job.space = M.SpotSpace.of(slide_space(a.data, ck["features"], name, ck["spatial"]), ck["feat_mean"],
                                       ck["feat_std"], dev)
        if scale is None and a.calibrate is not False and ck["val_expr"] is not None:
            scale = calibration(job)
        job.scale = scale
        t0 -= sample_slice(dst, name, job, rank, world, N, G, t0)   # the time of earlier, stopped runs counts
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
