"""Whole-slide speed, memory and disk of the image path: tissue to AnnData, stage by stage.

    python bench/wsi_bench.py                                   # CPU: stain features, `small` backbone
    python bench/wsi_bench.py --preset cellfm-800m --encoder uni --amp --batch-size 256   # a GPU
    python bench/wsi_bench.py --bins 8 --spots 3000,600000 --preset tiny --peers stflow,triplex,merge   # Time@HR
    python bench/wsi_bench.py --bins 8 --spots 3000,600000 --preset small --reuse   # the same grids and features

The slide is built once from real tissue: the tissue of Her2ST's imaged slices (their bounding
boxes) tiled into one pyramidal, JPEG-tiled TIFF at 0.69 µm/px, read through OpenSlide. The same
slide is then gridded at three pitches to give about 1k, 10k and 50k pseudo-spots, so that only
the number of spots changes. Each stage runs as its own process; its wall time, peak resident
memory (VmHWM of that process) and the files it leaves (MB) are reported, with the memory ratio
largest / smallest spot count. The slice file holds no patches: extract_features.py crops them
from the slide. Sampling uses random weights (speed does not depend on them), K = 5, S = 1.
--joint also samples each grid with a `--spatial joint` run, the whole slide in lockstep, beside the
spot-wise sampler in the same run (targets: time at most 1.3x and memory at 50k spots at most 1.5x that
at 1k).
--bins 8 (or 16) grids Visium HD's square bins instead: the bin stays 8 µm and each spot count gets its own
slide, the mosaic cut to the smallest square around the first slice's tissue that holds that many bins
(600k bins of 8 µm are 38 mm²). The smallest count that works is about 3,000: 1,000 bins are 0.064 mm², a
piece the tissue detector drops as a speck (under 0.05 mm² once its gaps are cut out).
--peers predicts each slide with baselines.py's methods too (the paper's Time@HR, Table S5), each fitted one
epoch on Her2ST (fit included in its time); a process that passes --cap-gib is stopped and reported OOM.
Each grid's folder records every stage's measurement as it finishes (stages.json); --reuse keeps them, so
that a stopped run resumes at its first unfinished stage and a run with another --preset times only its
sampling (the grid, features and peers do not depend on the backbone). Sampling stopped part-way (Ctrl-C,
`kill`) continues from sample.py's finished pieces, and its time is the sum of its runs'.
Targets at 50k spots on 2 CPU cores: tissue to AnnData in at most 20 minutes, at most 200 MB of
intermediate files (slice file, features, prediction .h5; the .h5ad is the output), peak memory
at most 1.5x that at 1k spots. On a machine shared with other jobs, run it with OMP_NUM_THREADS=1:
two OpenMP threads that wait for each other on an oversubscribed CPU ran the sampler 2.5-4x (`small`)
and 18x (`tiny`) slower than one thread did.
"""
import argparse
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import h5py
import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import readers as R  # noqa: E402
from checkpoints import gene_tokens, save_run

Image.MAX_IMAGE_PIXELS = None
UM_PER_PX = 0.69                                         # Her2ST patients B-H


def square_of_tissue(mask, centre, area):
    """The smallest square around `centre` (row, col), clipped to the mask, holding `area` pixels of tissue
    -> (top, bottom, left, right)."""
    inside = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))   # tissue above and left of each corner
    for k in range(1, max(mask.shape) + 1):
        t, b = max(centre[0] - k, 0), min(centre[0] + k, mask.shape[0])
        lf, r = max(centre[1] - k, 0), min(centre[1] + k, mask.shape[1])
        if inside[b, r] - inside[t, r] - inside[b, lf] + inside[t, lf] >= area:
            break
    return t, b, lf, r


def build_slide(raw, path, cols=3, tissue_um2=None):
    """Tile the tissue bounding boxes of Her2ST's imaged slices into one pyramidal TIFF; with `tissue_um2`, cut it
    to the smallest square around the first slice's tissue that holds that area (600k bins of 8 µm are 38 mm²)."""
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
    if tissue_um2:                                       # the smallest square around the first slice's tissue
        thumb, scale = R.ArrayImage(mosaic).overview(R.OVERVIEW_SIDE)
        mask = R.tissue_mask(thumb, UM_PER_PX / scale)
        centre = [int(v.mean()) for v in np.nonzero(mask[:int(h * scale), :int(w * scale)])]
        t, b, lf, r = (int(v / scale) for v in square_of_tissue(mask, centre, tissue_um2 / (UM_PER_PX / scale) ** 2))
        mosaic = mosaic[t:b, lf:r]
    R.write_slide_tiff(path, mosaic, UM_PER_PX)
    return mosaic.shape


class Stage(NamedTuple):
    secs: float                # wall time
    cpu_s: float               # CPU time (user + system) of the process and its children: on a shared machine
    mib: float                 # peak resident memory (VmHWM)
    mb: float = 0.0            # files the stage leaves
    oom: bool = False          # stopped at the memory cap
    reused: bool = False       # read back from an earlier run of the same grid (--reuse)
    stopped: bool = False      # stopped by the user (Ctrl-C, SIGTERM) before it finished
    runs: int = 1              # sample.py stopped and continued: the time of every run, summed


def timed(*cmd, env=None, cap_mib=None):
    """Run a command -> Stage. The peak is VmHWM, polled while it runs: getrusage would count the memory
    of this process, which the child inherits at fork; CPU time is the children's getrusage delta. A process
    whose memory passes `cap_mib` is stopped and reported out of memory, before the kernel's OOM killer
    picks a victim on a shared machine (one the kernel killed first is reported out of memory too); one stopped by
    the user returns its time so far."""
    t0, peak, before = time.time(), 0, resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM")])
            except (FileNotFoundError, ProcessLookupError):
                pass
            if cap_mib and peak / 1024 > cap_mib:
                proc.kill()
                proc.wait()
                return Stage(time.time() - t0, float("nan"), peak / 1024, oom=True)
            time.sleep(0.05)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode in (-signal.SIGTERM, -signal.SIGINT):
        return Stage(time.time() - t0, cpu, peak / 1024, stopped=True)
    if proc.returncode == -signal.SIGKILL:               # the kernel's OOM killer, faster than the poll above
        return Stage(time.time() - t0, cpu, peak / 1024, oom=True)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return Stage(time.time() - t0, cpu, peak / 1024)


def recorded(record):
    """The measurements of a grid's stages.json ({} before its first stage)."""
    return json.load(open(record)) if os.path.isfile(record) else {}


def measured(record, key, reuse, run, resumes=False):
    """A stage's Stage: read back from `record` (a grid's stages.json) with --reuse when an earlier run measured it,
    else run() now and added to the record, so that a run stopped part-way keeps its finished stages. A stage that
    `resumes` (sample.py keeps its finished pieces) and is stopped is recorded as such; --reuse continues it and
    adds the stopped runs' time and CPU time, and their peak."""
    done = recorded(record).get(key) if reuse else None
    if done and not done.get("stopped"):
        return Stage(**{**done, "reused": True})
    stage = run()
    if done and resumes:
        stage = stage._replace(secs=stage.secs + done["secs"], cpu_s=stage.cpu_s + done["cpu_s"],
                               mib=max(stage.mib, done["mib"]), runs=done.get("runs", 1) + 1)
    if resumes or not stage.stopped:                     # read again: another run may have added a stage
        json.dump({**recorded(record), key: stage._asdict()}, open(record, "w"), indent=1)
    if stage.stopped:
        raise SystemExit(f"stopped during {key} after {stage.secs:.0f} s" +
                         ("; run the same command with --reuse to continue it" if resumes else ""))
    return stage


def write_random_run(path, preset, genes, encoder, dim, spatial="none"):
    """A run with random weights: sampling speed does not depend on them. A spatial run reads the spots within
    1.5 pitches (≈ the 6 neighbours of a hexagonal grid). Written once: sample.py continues a stopped run only
    with the same checkpoint file."""
    if os.path.isfile(path):
        return
    tokens, vocab = gene_tokens(np.zeros(genes), M.make_config(preset).vocab)
    cfg = M.make_config(preset, vocab=vocab, n_genes=genes, hist_dim=dim, spatial=spatial)
    radius = {"k": 6, "radius_um": None, "radius_pitch": 1.5} if spatial != "none" else None
    save_run(path, M.Hinge(cfg, tokens), [f"G{i}" for i in range(genes)], [encoder], np.zeros(dim), np.ones(dim),
             spatial=radius)


def megabytes(*paths):
    return sum(os.path.getsize(q) for q in paths) / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default=os.path.join(ROOT, "..", "shared", "data", "her2st"), help="Her2ST data folder")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "wsi_bench"), help="working folder")
    p.add_argument("--spots", default="1000,10000,50000", help="target numbers of pseudo-spots")
    p.add_argument("--encoder", default="stain", help="stain (CPU) or uni/conch with random weights (GPU)")
    p.add_argument("--preset", default="small", help="backbone for sampling (default small; cellfm-800m on a GPU)")
    p.add_argument("--genes", type=int, default=300, help="genes generated (default 300)")
    p.add_argument("--batch-size", type=int, help="sample.py spots per batch (its default when omitted)")
    p.add_argument("--joint", action="store_true",
                   help="also sample with a --spatial joint run (the lockstep sampler), side by side")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast in features and sampling (GPUs, CPUs with bf16 units)")
    p.add_argument("--bins", type=float, help="Visium HD: square bins of this many µm (8 or 16) instead of hexagonal "
                                              "spots; each spot count gets a slide cut to the tissue it needs")
    p.add_argument("--peers", default="", help="also predict each slide with these baselines.py methods (e.g. "
                                               "stflow,triplex,merge), fitted 1 epoch on --quality-data's fold B4")
    p.add_argument("--quality-data", default=os.path.join(ROOT, "runs", "quality", "data"),
                   help="prepared Her2ST with features of --encoder, for --peers (bash bench/quality.sh --data-only)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the stages an earlier run of the same grids measured (marked *): a stopped run resumes, "
                        "and a run with another --preset samples the same features")
    p.add_argument("--peer-size", choices=["cpu", "paper"], default="cpu",
                   help="the peers' widths (baselines.py --size): reduced, as in the CPU quality benchmark "
                        "(default), or each paper's")
    p.add_argument("--cap-gib", type=float, default=22.0,
                   help="a peer whose memory passes this is stopped and reported OOM (default 22 of this machine's 24)")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill` stops it as Ctrl-C does: measured() records
    os.makedirs(a.out, exist_ok=True)
    if not a.bins:                                       # one slide, gridded at each count's pitch (bins: below)
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
    run = os.path.join(a.out, f"run_{a.preset}_{a.encoder}_{a.genes}")   # its settings in the name: written once
    write_random_run(os.path.join(run, "best.pt"), a.preset, a.genes, a.encoder, dim)
    joint_run = os.path.join(a.out, f"run_{a.preset}_{a.encoder}_{a.genes}_joint")
    if a.joint:
        write_random_run(os.path.join(joint_run, "best.pt"), a.preset, a.genes, a.encoder, dim, "joint")
    py, amp = sys.executable, ["--amp"] if a.amp else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the keys of stages.json name what a measurement depends on, so that --reuse never reads another setting's
    features, how = f"features {a.encoder}{' bf16' * a.amp}", \
        f"{a.preset}, {a.genes} genes, batch {a.batch_size or 'default'}, {'bf16' if a.amp else 'fp32'}"
    rows = []                                            # per spot count: (n, pitch, {stage: Stage}, AnnData MB)
    peers = [m for m in a.peers.split(",") if m]
    for target in map(int, a.spots.split(",")):
        if a.bins:                                       # the bin is fixed: the tissue changes with the count
            pitch, kind, diameter = a.bins, "square", a.bins
            image = os.path.join(a.out, f"slide_bins{a.bins:g}_{target}", "slide.tif")   # the slice's name: slide
            if not os.path.isfile(image):
                os.makedirs(os.path.dirname(image), exist_ok=True)
                build_slide(a.raw, image, tissue_um2=target * a.bins ** 2)
            data = os.path.join(a.out, f"bins{a.bins:g}_{target}")
        else:                                            # hexagonal: pitch²·√3/2 of tissue per spot
            pitch, kind, diameter = float(np.sqrt(tissue_um2 / (target * np.sqrt(3) / 2))), "hex", 55.0
            image, data = slide, os.path.join(a.out, f"n{target}")
        record = os.path.join(data, "stages.json")      # each stage's measurement, written as it finishes
        done = recorded(record) if a.reuse else {}
        if not all(k in done for k in ("tissue detection", "prepare_data.py", features)):
            shutil.rmtree(data, ignore_errors=True)      # the grid from the start: the disk column counts its files
            os.makedirs(data)
        grid = ["--grid", kind, "--spot-pitch-um", f"{pitch:.3f}", "--spot-diameter-um", f"{diameter:g}"]
        detect = measured(record, "tissue detection", a.reuse, lambda: timed(
            py, "-c", "import sys, readers; readers.read_slides([sys.argv[1]], None, float(sys.argv[2]), "
            "float(sys.argv[3]), sys.argv[4])", image, f"{pitch:.3f}", f"{diameter:g}", kind, env=env))
        prep = measured(record, "prepare_data.py", a.reuse, lambda: timed(
            py, "prepare_data.py", "--dataset", "image", "--image", image, *grid, "--out", data, env=env))
        feat = measured(record, features, a.reuse, lambda: timed(
            py, "extract_features.py", "--data", data, "--encoder", a.encoder, *amp,
            *(["--random-init"] if a.encoder != "stain" else []), env=env))
        peer_stages = {}                                 # not part of tissue to AnnData: another method's prediction,
        for m in peers:                                  # before HINGE's sampling, which may take several runs
            key = f"peer {m} {a.encoder}" + " paper" * (a.peer_size == "paper")   # cpu: the records before the flag
            stage = measured(record, key, a.reuse, lambda: timed(
                py, "baselines.py", "--data", a.quality_data, "--features", a.encoder, "--test-slice", "B4",
                "--exclude", "B4", "--method", m, "--epochs", "1", "--size", a.peer_size, "--predict-data", data,
                "--out", os.path.join(data, f"pred_{m}"), "--overwrite", env=env, cap_mib=a.cap_gib * 1024))
            peer_stages[f"{m} (fit + predict)"] = stage if stage.oom else stage._replace(
                mb=megabytes(*glob.glob(os.path.join(data, f"pred_{m}", "*.h5"))))
        bs = ["--batch-size", str(a.batch_size)] if a.batch_size else []
        pred = os.path.join(data, f"pred_{a.preset}")    # one folder per preset: a --reuse run with another keeps both
        samp = measured(record, f"sampling {how}", a.reuse, lambda: timed(
            py, "sample.py", "--run", run, "--data", data, "--slices", "slide", "--steps", "5", "--samples", "1",
            "--out", pred, "--overwrite", *bs, *amp, env=env), resumes=True)
        with h5py.File(os.path.join(data, "slices", "slide.h5"), "r") as f:
            n = len(f["barcode"])
        slice_files = [os.path.join(data, q) for q in ("slices/slide.h5", "slices.tsv", "prepare.json")]
        stages = {"tissue detection": detect,            # prepare_data.py = detection + grid and slice file
                  # prepare_data.py less a detection timed on its own: at 1k spots the two are within noise, so >= 0
                  "slice file (grid)": Stage(max(0.0, prep.secs - detect.secs), max(0.0, prep.cpu_s - detect.cpu_s),
                                             prep.mib, megabytes(*slice_files), reused=prep.reused),
                  "features (crop + embed)": feat._replace(
                      mb=megabytes(os.path.join(data, "features", a.encoder, "slide.h5"))),
                  "sampling + AnnData": samp._replace(mb=megabytes(os.path.join(pred, "slide.h5")))}
        if a.joint:                                      # not part of tissue to AnnData: the same stage, jointly
            stages["joint sampling (lockstep)"] = measured(record, f"joint {how}", a.reuse, lambda: timed(
                py, "sample.py", "--run", joint_run, "--data", data, "--slices", "slide", "--steps", "5",
                "--samples", "1", "--out", pred + "_joint", "--overwrite", *bs, *amp, env=env), resumes=True)
        stages.update(peer_stages)
        rows.append((n, pitch, stages, megabytes(os.path.join(pred, "slide.h5ad"))))
        print(f"-- {n} spots (pitch {pitch:.1f} µm): " + ", ".join(f"{k} {v.secs:.1f} s" for k, v in stages.items()),
              flush=True)

    what = f"{a.bins:g} µm bins, each count on a slide cut to its tissue" if a.bins else \
        f"slide {img.size[0]} x {img.size[1]} px, tissue {tissue_um2 / 1e6:.1f} mm²"
    print(f"\n{what} ({UM_PER_PX} µm/px); {a.encoder} features, {a.preset} backbone, K = 5, S = 1, "
          f"{f'peers at --size {a.peer_size}, ' if peers else ''}"
          f"{'bf16' if a.amp else 'fp32'}, device {dev} ({os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f} at the end)")
    cell = "s, CPU s, spots/s, MiB, MB"
    print(f"{'stage':<26}" + "".join(f"{f'{n} spots: {cell}':>44}" for n, *_ in rows) + f"{'MiB ratio':>11}")
    # beside tissue to AnnData: detection (prepare_data.py's time holds it), the joint sampler and the peers
    apart = {"tissue detection", "joint sampling (lockstep)", *(f"{m} (fit + predict)" for m in peers)}
    totals = [Stage(sum(v.secs for k, v in r[2].items() if k not in apart),
                    sum(v.cpu_s for k, v in r[2].items() if k not in apart),
                    max(v.mib for k, v in r[2].items() if k not in apart or k == "tissue detection"),
                    sum(v.mb for k, v in r[2].items() if k not in apart),
                    reused=any(v.reused for k, v in r[2].items() if k not in apart)) for r in rows]
    table = {**{k: [r[2][k] for r in rows] for k in rows[0][2]}, "tissue to AnnData": totals}
    for stage, cells in table.items():
        rate = [r[0] / c.secs if c.secs else float("inf") for r, c in zip(rows, cells)]
        text = [(f"OOM at {c.mib:.0f} MiB after {c.secs:.0f} s" if c.oom else
                 f"{c.secs:.1f}, {c.cpu_s:.1f}, {v:.1f}, {c.mib:.0f}, {c.mb:.1f}") + "*" * c.reused +
                f" ({c.runs} runs)" * (c.runs > 1)
                for v, c in zip(rate, cells)]
        print(f"{stage:<26}" + "".join(f"{t:>44}" for t in text) + f"{cells[-1].mib / cells[0].mib:>10.2f}x")
    print(f"{'(AnnData output, MB)':<26}" + "".join(f"{r[3]:>44.1f}" for r in rows))
    n, last = rows[-1][0], totals[-1]
    print(f"at {n} spots: {last.secs / 60:.1f} min wall, {last.cpu_s / 60:.1f} CPU min (target <= 20 min on 2 cores), "
          f"{last.mb:.0f} MB of intermediate files (target <= 200), peak memory "
          f"{last.mib / totals[0].mib:.2f}x that at {rows[0][0]} spots (target <= 1.5)")
    if a.joint:
        j = "joint sampling (lockstep)"
        ratios = ", ".join(f"{r[0]}: {r[2][j].secs / r[2]['sampling + AnnData'].secs:.2f}x" for r in rows)
        print(f"joint (lockstep) / spot-wise sampling time, side by side: {ratios} (target <= 1.3); joint peak memory "
              f"{rows[-1][2][j].mib / rows[0][2][j].mib:.2f}x that at {rows[0][0]} spots (target <= 1.5)")
    for m in peers:                                      # the paper's Time@HR: each method's time over HINGE K = 5's
        cells = [(r[0], r[2][f"{m} (fit + predict)"], r[2]["sampling + AnnData"]) for r in rows]
        print(f"{m} / HINGE sampling time: " + ", ".join(f"{n}: {'OOM' if c.oom else f'{c.secs / h.secs:.2f}x'}"
                                                         for n, c, h in cells))
    print(f"(pitch per column: {', '.join(f'{r[1]:.1f} µm' for r in rows)}; MB = files the stage leaves, the .h5ad "
          "apart; tissue to AnnData = prepare_data.py + extract_features.py + sample.py, its MiB the largest stage's; "
          "CPU s = user + system time of the stage's process; * = measured by an earlier run of the grid, --reuse; "
          "(n runs) = stopped and continued n - 1 times, the runs' time summed)")


if __name__ == "__main__":
    main()
