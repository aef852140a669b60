"""The one-GPU check that bench/gpu.sh runs (see there): sampler and encoder throughput, peak GPU
memory, torchrun --nproc_per_node 1 sample.py against a plain run, and sample.py over a whole Visium HD
slide of 8 µm bins, on synthetic data it writes under --work. --cpu-smoke runs every piece on the CPU at
tiny sizes, to check the script itself.
"""
import argparse
import os
import subprocess
import sys
from typing import NamedTuple

import h5py
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import extract_features as X  # noqa: E402
import model as M  # noqa: E402
from diffusion import generate, make_diffusion  # noqa: E402
from checkpoints import build_model, save_run
from common import str_array
from runtime import synced_seconds
from wsi_bench import timed

HIST_DIM = 1536                # UNI 1024 + CONCH 512, the paper's histology vector


class Sizes(NamedTuple):
    batch: int                 # spots or patches per forward pass
    batches: int               # timed batches
    warmup: bool               # one untimed batch first (kernels, allocator)
    genes: int
    spots: int                 # spots of the synthetic slice sample.py runs on
    sample_batch: int          # sample.py --batch-size
    slide_bins: int            # bins of the whole-slide run: bench/wsi_bench.py's 600k grid of 8 µm bins
    slide_batch: int           # its sample.py --batch-size
    shrink: dict               # Config fields overriding the preset's width and depth (--cpu-smoke)


GPU = Sizes(batch=256, batches=3, warmup=True, genes=300, spots=2048, sample_batch=256, slide_bins=600_536,
            slide_batch=1024, shrink={})
SMOKE = Sizes(batch=1, batches=1, warmup=False, genes=40, spots=48, sample_batch=16, slide_bins=100, slide_batch=16,
              shrink={"dim": 32, "layers": 2, "heads": 2})


#################################################################################
#                                 Throughput                                    #
#################################################################################

def peak_gib(dev):
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def sampler_rate(preset, sz, dev, amp):
    """Spots/s of the sampler at K = 5, S = 1 on random weights and features (speed does not depend on them)."""
    cfg = M.make_config(preset, n_genes=sz.genes, hist_dim=HIST_DIM, **sz.shrink)
    gene_ids = torch.arange(1, sz.genes + 1)  # on the CPU: scGPT reads them with numpy
    # built on the device: an 800M-parameter init on the CPU takes minutes
    with torch.device(dev):
        net = build_model(cfg, gene_ids).to(dev).eval()
    diffusion = make_diffusion("masked", sz.genes, 50, "poly-auto", "gauss")
    hist = torch.randn(sz.batch, HIST_DIM, device=dev)
    gen = torch.Generator(dev).manual_seed(0)
    with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
        if sz.warmup:
            generate(net, diffusion, hist, 5, 1, gen)
        secs = sum(synced_seconds(dev, lambda: generate(net, diffusion, hist, 5, 1, gen)) for _ in range(sz.batches))
    return sz.batch * sz.batches / secs


def encoder_rate(name, sz, dev, amp):
    """Patches/s of extract_features.py's encoder (random weights), 224-px uint8 patches in, as from a slice."""
    enc = X.NeuralEncoder(name, None, True, str(dev), amp)
    patches = np.random.default_rng(0).integers(0, 256, (sz.batch, 224, 224, 3), dtype=np.uint8)
    if sz.warmup:
        enc(patches)
    return sz.batch * sz.batches / sum(synced_seconds(dev, lambda: enc(patches)) for _ in range(sz.batches))


#################################################################################
#                        torchrun against one process                           #
#################################################################################

def write_synthetic(work, sz, n):
    """A slice of n random spots with random 1536-d features and a train.py checkpoint (`small`) of random weights."""
    rng, G = np.random.default_rng(0), sz.genes
    side = int(np.ceil(np.sqrt(n)))
    array = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int32)
    data = os.path.join(work, f"data{n}")
    os.makedirs(os.path.join(data, "slices"))
    os.makedirs(os.path.join(data, "features", "synthetic"))
    barcodes = str_array(f"{c}x{r}" for c, r in array)
    with h5py.File(os.path.join(data, "slices", "s.h5"), "w") as f:
        f["barcode"], f["array"], f["pixel"] = barcodes, array, (array * 100.0).astype(np.float32)
    with h5py.File(os.path.join(data, "features", "synthetic", "s.h5"), "w") as f:
        f["barcode"], f["embeddings"] = barcodes, rng.standard_normal((n, HIST_DIM), dtype=np.float32)
    with open(os.path.join(data, "slices.tsv"), "w") as f:
        f.write(f"slice\tpatient\tn_spots\thas_image\ns\ts\t{n}\t0\n")
    cfg = M.make_config("small", vocab=G, n_genes=G, hist_dim=HIST_DIM, **sz.shrink)
    torch.manual_seed(0)
    run = os.path.join(work, f"run{n}")
    save_run(os.path.join(run, "best.pt"), M.Hinge(cfg, np.arange(1, G + 1)), [f"G{i}" for i in range(G)],
               ["synthetic"], np.zeros(HIST_DIM), np.ones(HIST_DIM), test_slice="s")
    return data, run


def torchrun_equals_one_process(work, sz, dev, amp):
    """sample.py under `torchrun --nproc_per_node 1` and as a plain process -> (equal, max |Δpred|)."""
    data, run = write_synthetic(work, sz, sz.spots)
    args = ["sample.py", "--run-dir", run, "--data", data, "--steps", "5", "--samples", "2", "--device", dev.type,
            "--batch-size", str(sz.sample_batch)] + (["--amp"] if amp else [])
    launchers = {"one": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", "1"]}
    pred = {}
    for label, launch in launchers.items():
        out = os.path.join(work, label)
        subprocess.run([*launch, *args, "--out", out], cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
        with h5py.File(os.path.join(out, "s.h5"), "r") as f:
            pred[label] = f["pred"][()]
    return np.array_equal(pred["one"], pred["torchrun"]), float(np.abs(pred["one"] - pred["torchrun"]).max())


def slide_sampling(work, sz, dev, amp):
    """sample.py (K = 5, S = 1) over a whole slide of sz.slide_bins random spots, to AnnData -> Stage: wall s and
    peak host MiB, of the same sampling bench/wsi_bench.py times on the CPU (speed does not depend on the values)."""
    data, run = write_synthetic(work, sz, sz.slide_bins)
    out = os.path.join(work, "slide")
    stage = timed(sys.executable, "sample.py", "--run-dir", run, "--data", data, "--steps", "5", "--samples", "1",
                  "--device", dev.type, "--batch-size", str(sz.slide_batch), "--out", out, *(["--amp"] * amp))
    if not os.path.isfile(os.path.join(out, "s.h5ad")):
        sys.exit("error: the whole-slide sample.py run wrote no AnnData")
    return stage


#################################################################################
#                                     Main                                      #
#################################################################################

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True,
                   help="empty folder for the synthetic data (bench/gpu.sh passes a temporary one)")
    p.add_argument("--cpu-smoke", action="store_true", help="every piece on the CPU at tiny sizes (checks the script, "
                                                            "measures nothing)")
    a = p.parse_args()
    sz = SMOKE if a.cpu_smoke else GPU
    if not a.cpu_smoke and not torch.cuda.is_available():
        sys.exit("error: no GPU visible to torch; run on a GPU machine, or pass --cpu-smoke")
    dev = torch.device("cpu" if a.cpu_smoke else "cuda")
    amp = not a.cpu_smoke                                # bf16 on the GPU; fp32 in the smoke run
    name = "CPU smoke run, tiny sizes" if a.cpu_smoke else torch.cuda.get_device_name(dev)
    print(f"{name}; torch {torch.__version__}; {'bf16' if amp else 'fp32'}, batch {sz.batch}, {sz.genes} genes, "
          f"{HIST_DIM}-d features, random weights", flush=True)
    rows = []                                        # (what, result, peak GPU GiB or None)

    def record(what, result, peak=None):             # each row shown as it is measured: a GPU run can stop midway
        rows.append((what, result, peak))
        print(f"  {what}: {result}", flush=True)

    for preset in ("cellfm-800m", "scgpt"):
        what = f"sampler {preset} (K = 5, S = 1)"
        if preset not in M.PRESETS:                  # the scGPT backbone may not be merged yet
            record(what, f"skipped: no preset {preset!r} in model.PRESETS")
            continue
        reset_peak(dev)
        record(what, f"{sampler_rate(preset, sz, dev, amp):.1f} spots/s", peak_gib(dev))
    for enc in ("uni", "conch"):
        reset_peak(dev)
        record(f"encoder {enc}", f"{encoder_rate(enc, sz, dev, amp):.1f} patches/s", peak_gib(dev))
    slide = slide_sampling(a.work, sz, dev, amp)
    record(f"sample.py, slide of {sz.slide_bins:,} bins", f"{slide.secs:.0f} s to AnnData, "
           f"{sz.slide_bins / slide.secs:.0f} bins/s, {slide.mib:,.0f} MiB host")
    equal, diff = torchrun_equals_one_process(a.work, sz, dev, amp)
    record("torchrun --nproc_per_node 1 sample.py", f"{'equal' if equal else 'DIFFERS'} to one process "
                                                    f"(max |pred diff| {diff:.3g})")
    print(f"\n{'piece':<38}{'result':<46}{'peak GPU memory':>16}")
    for what, result, peak in rows:
        print(f"{what:<38}{result:<46}{'–' if peak is None else f'{peak:.2f} GiB':>16}")
    if not equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
