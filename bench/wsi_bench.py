"""Whole-slide speed and memory of the image path: tissue detection, patching, features, sampling.

    python bench/wsi_bench.py                                   # CPU: stain features, `tiny` backbone
    python bench/wsi_bench.py --preset cellfm-800m --encoder uni --amp --batch-size 256   # a GPU

The slide is built once from real tissue: the tissue of Her2ST's imaged slices (their bounding
boxes) tiled into one pyramidal, JPEG-tiled TIFF at 0.69 µm/px, read through OpenSlide. The same
slide is then gridded at three pitches to give about 1k, 10k and 50k pseudo-spots, so that only
the number of spots changes. Each stage runs as its own process; its wall time and peak resident
memory (VmHWM of that process) are reported, with spots/s and the memory ratio 50k / 1k.
Sampling uses random weights (speed does not depend on them), K = 5, S = 1.
"""
import argparse
import glob
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import readers as R  # noqa: E402
from common import gene_tokens  # noqa: E402

Image.MAX_IMAGE_PIXELS = None
UM_PER_PX = 0.69                                         # Her2ST patients B-H


def build_slide(raw, path, cols=3):
    """Tile the tissue bounding boxes of Her2ST's imaged slices into one pyramidal TIFF."""
    tiles = []
    for jpg in sorted(glob.glob(os.path.join(raw, "ST-imgs", "*", "*", "*.jpg"))):
        img = np.asarray(Image.open(jpg).convert("RGB"))
        thumb, scale = R.ArrayImage(img).overview(R.OVERVIEW_SIDE)
        ys, xs = np.nonzero(R.tissue_mask(thumb, UM_PER_PX / scale))
        tiles.append(img[int(ys.min() / scale):int(ys.max() / scale), int(xs.min() / scale):int(xs.max() / scale)])
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // cols)
    mosaic = np.full((rows * h, cols * w, 3), 242, np.uint8)  # glass between the tissue pieces
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        mosaic[r * h:r * h + t.shape[0], c * w:c * w + t.shape[1]] = t
    R.write_slide_tiff(path, mosaic, UM_PER_PX)
    return mosaic.shape


def timed(*cmd, env=None):
    """Run a command; -> (seconds, its peak resident memory in MiB). The peak is VmHWM, polled while
    it runs: getrusage would count the memory of this process, which the child inherits at fork."""
    t0, peak = time.time(), 0
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM")])
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.time() - t0, peak / 1024


def write_random_run(path, preset, genes, encoder, dim):
    """A run with random weights: sampling speed does not depend on them."""
    tokens, vocab = gene_tokens(np.zeros(genes), M.make_config(preset).vocab)
    cfg = M.make_config(preset, vocab=vocab, n_genes=genes, hist_dim=dim)
    M.save_run(path, M.Hinge(cfg, tokens), [f"G{i}" for i in range(genes)], [encoder], np.zeros(dim), np.ones(dim))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default=os.path.join(ROOT, "..", "shared", "data", "her2st"), help="Her2ST data folder")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "wsi_bench"), help="working folder")
    p.add_argument("--spots", default="1000,10000,50000", help="target numbers of pseudo-spots")
    p.add_argument("--encoder", default="stain", help="stain (CPU) or uni/conch with random weights (GPU)")
    p.add_argument("--preset", default="tiny", help="backbone for sampling (tiny on CPU; cellfm-800m on a GPU)")
    p.add_argument("--genes", type=int, default=300, help="genes generated (default 300)")
    p.add_argument("--batch-size", type=int, help="sample.py spots per batch (its default when omitted)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in features and sampling (GPUs)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    slide = os.path.join(a.out, "slide.tif")
    if not os.path.isfile(slide):
        t0 = time.time()
        shape = build_slide(a.raw, slide)
        print(f"built {slide}: {shape[1]} x {shape[0]} px of real tissue in {time.time() - t0:.0f} s")
    img = R.open_image(slide)
    thumb, scale = img.overview(R.OVERVIEW_SIDE)
    tissue_um2 = R.tissue_mask(thumb, UM_PER_PX / scale).sum() * (UM_PER_PX / scale) ** 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dim = {"stain": 74, "uni": 1024, "conch": 512}[a.encoder]
    run = os.path.join(a.out, f"run_{a.preset}_{a.encoder}")
    write_random_run(os.path.join(run, "best.pt"), a.preset, a.genes, a.encoder, dim)
    py, amp = sys.executable, ["--amp"] if a.amp else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = []
    for target in map(int, a.spots.split(",")):
        pitch = float(np.sqrt(tissue_um2 / (target * np.sqrt(3) / 2)))  # hexagonal: pitch²·√3/2 of tissue per spot
        data = os.path.join(a.out, f"n{target}")
        grid = ["--spot-pitch-um", f"{pitch:.3f}", "--spot-diameter-um", "55"]
        detect = timed(py, "-c", "import sys, readers; readers.read_slides([sys.argv[1]], None, float(sys.argv[2]), 55.0, 'hex')",
                       slide, f"{pitch:.3f}", env=env)
        prep = timed(py, "prepare_data.py", "--dataset", "image", "--image", slide, *grid, "--out", data, "--overwrite", env=env)
        feat = timed(py, "extract_features.py", "--data", data, "--encoder", a.encoder, "--overwrite", *amp,
                     *(["--random-init"] if a.encoder != "stain" else []), env=env)
        bs = ["--batch-size", str(a.batch_size)] if a.batch_size else []
        samp = timed(py, "sample.py", "--run", run, "--data", data, "--slices", "slide", "--steps", "5", "--samples", "1",
                     "--out", os.path.join(data, "pred"), "--overwrite", *bs, *amp, env=env)
        with h5py.File(os.path.join(data, "slices", "slide.h5"), "r") as f:
            n = len(f["barcode"])
        patch_s = prep[0] - detect[0]                    # prepare = detection + patching
        rows.append((n, pitch, detect, (patch_s, prep[1]), feat, samp))
        print(f"-- {n} spots (pitch {pitch:.1f} µm): detection {detect[0]:.1f} s, patching {patch_s:.1f} s, "
              f"features {feat[0]:.1f} s, sampling {samp[0]:.1f} s", flush=True)

    print(f"\nslide {img.size[0]} x {img.size[1]} px ({UM_PER_PX} µm/px), tissue {tissue_um2 / 1e6:.1f} mm²; "
          f"{a.encoder} features, {a.preset} backbone, K = 5, S = 1, device {dev}")
    print(f"{'stage':<18}" + "".join(f"{f'{n} spots: s, spots/s, MiB':>34}" for n, *_ in rows) + f"{'MiB ratio':>11}")
    for k, stage in enumerate(["tissue detection", "patching", "features", "sampling"]):
        cells = [f"{r[2 + k][0]:.1f}, {r[0] / r[2 + k][0]:.1f}, {r[2 + k][1]:.0f}" for r in rows]
        print(f"{stage:<18}" + "".join(f"{c:>34}" for c in cells) + f"{rows[-1][2 + k][1] / rows[0][2 + k][1]:>10.2f}x")
    print(f"(pitch per row: {', '.join(f'{r[1]:.1f} µm' for r in rows)}; MiB ratio = peak memory at {rows[-1][0]} / "
          f"{rows[0][0]} spots)")


if __name__ == "__main__":
    main()
