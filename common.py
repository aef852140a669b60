"""Helpers shared by the stage scripts: one-line user errors, atomic HDF5 writes, slice-file I/O."""
import contextlib
import glob
import json
import os
import sys
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd


class UserError(Exception):
    """A mistake in the user's input: printed as one line (file, what is wrong, what to do), no traceback."""


def run(main):
    """Call main(); user mistakes end the program with a one-line error and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name; rename it to `path` only when the block completes, so an interrupted
    run never leaves a half file that a later stage trusts."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by a killed run
        os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_h5(path):
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=False) as f:
            yield f


HUB_PREFIX = "hf-hub:"          # timm's form of a Hugging Face model id: hf-hub:<owner>/<name>


def resolve_weights(spec, filename):
    """A weights argument -> a local file. `hf-hub:<owner>/<name>` (as timm users write it) is `filename`
    of that Hugging Face repository, taken from the hub's cache or downloaded into it; anything else
    is a path, returned as given: nothing is fetched without the explicit prefix."""
    if not spec.startswith(HUB_PREFIX):
        return spec
    repo = spec[len(HUB_PREFIX):]
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    login = (f"accept the model's terms at https://huggingface.co/{repo} (gated models) and log in with `hf auth login` "
             "(`huggingface-cli login` before huggingface_hub 1.0)")
    try:
        return hf_hub_download(repo, filename)
    except GatedRepoError as e:                          # before its parent class RepositoryNotFoundError
        raise UserError(f"{spec}: gated model, access refused; {login}") from e
    except RepositoryNotFoundError as e:
        raise UserError(f"{spec}: no such repository on the Hugging Face hub, or a private/gated one; {login}") from e
    except LocalEntryNotFoundError as e:                 # offline (HF_HUB_OFFLINE=1) or no connection, and not cached
        raise UserError(f"{spec}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                        f"cannot be reached; online, {login}, then run again; or download {filename} yourself "
                        "and pass its path instead") from e
    except EntryNotFoundError as e:
        raise UserError(f"{spec}: the repository has no file {filename}; is it the right model?") from e
    except HFValidationError as e:
        raise UserError(f"{spec}: not a hub id; write hf-hub:<owner>/<name>, e.g. hf-hub:MahmoodLab/UNI") from e


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def str_array(items):
    return np.array([str(s).encode() for s in items], dtype="S")


def decode(arr):
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(arr).reshape(-1)]


def slice_path(data_dir, name):
    return os.path.join(data_dir, "slices", f"{name}.h5")


def existing_slice(data_dir, name):
    path = slice_path(data_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"{path}: slice {name} not found in {data_dir}; check the slice name (see slices.tsv)")
    return path


def list_slices(data_dir):
    """Slice names in the order of `<data>/slices.tsv` (written last by prepare_data.py)."""
    tsv = os.path.join(data_dir, "slices.tsv")
    if not os.path.isfile(tsv):
        raise UserError(f"{tsv} not found: run prepare_data.py --out {data_dir} first")
    with open(tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [r[0] for r in rows if r and r[0]]


def feature_path(data_dir, encoder, name):
    return os.path.join(data_dir, "features", encoder, f"{name}.h5")


class Features:
    """The histology vectors of one slice: the given encoders' embeddings concatenated in order
    (UNI first = the paper's 1536-d vector), read in row ranges so memory stays flat."""
    def __init__(self, data_dir, encoders, name):
        spath = existing_slice(data_dir, name)
        with h5py.File(spath, "r") as s:
            barcodes = s["barcode"][()]
        self.files = []
        for enc in encoders:
            p = feature_path(data_dir, enc, name)
            if not os.path.isfile(p):
                raise UserError(f"{p}: no {enc} features for slice {name}; run extract_features.py --data {data_dir} "
                                f"--encoder {enc}" + ("" if enc == "stain" else " --weights ..."))
            f = h5py.File(p, "r")
            if not np.array_equal(f["barcode"][()], barcodes):
                raise UserError(f"{p}: spots differ from {spath}; re-run extract_features.py with --overwrite")
            self.files.append(f)
        self.n = len(barcodes)
        self.dim = sum(f["embeddings"].shape[1] for f in self.files)
        self.has_aug = all("embeddings_aug" in f for f in self.files)

    def read(self, start=0, stop=None):                  # -> float32 [n, dim]
        return np.concatenate([f["embeddings"][start:stop] for f in self.files], 1)

    def read_aug(self):                                  # -> float32 [N, 8, dim]
        return np.concatenate([f["embeddings_aug"][()] for f in self.files], 2)

    def close(self):
        for f in self.files:
            f.close()


def read_slice(data_dir, name, keys=("expr",)):
    with h5py.File(existing_slice(data_dir, name), "r") as f:
        return {k: f[k][()] for k in keys}


def read_vocab(path):
    """Gene symbol -> token id: CellFM's gene_info.csv (id = row index + 1, as CellFM's own code builds it) or
    scGPT's vocab.json ({token: id}, ids from 0; its special tokens <pad>, <cls>, <eoc> are no genes)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: vocabulary file not found; pass CellFM's csv/gene_info.csv or scGPT's vocab.json")
    if path.lower().endswith(".json"):
        try:
            with open(path) as f:
                vocab = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); pass scGPT's vocab.json") from e
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
            raise UserError(f"{path}: not an scGPT vocab.json (an object of gene -> non-negative integer id)")
        return {g: i for g, i in vocab.items() if not (g.startswith("<") and g.endswith(">"))}  # symbols have no <>
    df = pd.read_csv(path)
    col = next((c for c in ("HGNC_gene", "gene_name", "gene", "symbol") if c in df.columns), None)
    if col is None:
        raise UserError(f"{path}: no HGNC_gene column (found {', '.join(map(str, df.columns[:6]))}); "
                        "pass CellFM's csv/gene_info.csv, whose rows give the token ids")
    return {str(g): i + 1 for i, g in enumerate(df[col])}


def read_gene_list(path):
    """A gene list, one symbol per line in model order (the official HINGE code's used_selected_gene_list.txt)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: gene list not found")
    genes = [g.strip() for g in open(path) if g.strip()]
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if not genes or dup:
        raise UserError(f"{path}: " + (f"genes listed twice: {', '.join(dup[:5])}" if dup else "no genes"))
    return genes


def gene_tokens(gene_ids, vocab):
    """CellFM token ids of the selected genes and the vocabulary size they index. Without a
    vocabulary (ids all 0) genes get their own ids 1..G, so the model can still tell them apart."""
    gene_ids = np.asarray(gene_ids)
    if (gene_ids == 0).all():
        return np.arange(1, len(gene_ids) + 1), len(gene_ids)
    return gene_ids, vocab


def init_distributed(device):
    """Under torchrun, join the process group (NCCL on GPUs, one per process; gloo on CPUs)
    -> (rank, world size, this process's device); a single process gets (0, 1, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch
        import torch.distributed as dist
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)                # NCCL's barrier uses the current device
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def synced_seconds(dev, f):
    """Wall seconds of f() on `dev`; on a GPU the queued work is finished before and after, since CUDA
    runs asynchronously and the clock would otherwise stop before the kernels do."""
    import time
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    f()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def add_fold_args(p):
    """The arguments that define a leave-one-slice-out fold and its validation split, shared by
    train.py and baselines.py so that both see the same training and validation spots."""
    p.add_argument("--data", required=True, help="folder written by prepare_data.py (with features/)")
    p.add_argument("--features", default="uni,conch", help="encoders to concatenate, in order (default uni,conch = 1536-d)")
    p.add_argument("--test-slice", required=True, help="held-out slice (leave-one-slice-out); never seen in training")
    p.add_argument("--exclude", default="", help="further slices to leave out of training (comma-separated)")
    p.add_argument("--val-frac", type=float, default=0.1, help="share of training spots for validation (default 0.1)")
    p.add_argument("--val-seed", type=int, default=42, help="seed of the validation split (default 42, as the official code)")
    p.add_argument("--context", type=int, default=0, metavar="K",
                   help="append to each spot's features the mean features of its K nearest spots on the same slide; "
                        "on other slides the same radius in µm is used (default 0: off)")


def add_runtime_args(p, batch_size, batch_help, seed=0):
    """--device, --amp, --batch-size and --seed, meaning the same in every script: where to run, bf16
    autocast, spots (or patches) per forward step, and the seed of this script's own random numbers."""
    import torch
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when present)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs; about 10x slower on CPUs without bf16 units)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--seed", type=int, default=seed, help=f"seed of this script's random numbers (default {seed})")


def training_pixel_size(data_dir, names):
    """Median µm/px of the training slices (None when none states it): the scale the model saw."""
    sizes = []
    for n in names:
        with h5py.File(existing_slice(data_dir, n), "r") as f:
            if "pixel_size_um" in f.attrs:
                sizes.append(float(f.attrs["pixel_size_um"]))
    return float(np.median(sizes)) if sizes else None


def feature_stats(H):
    """Per-dimension mean and std of the training features, used to standardise every slice."""
    return H.mean(0), H.std(0) + 1e-6


def training_slices(data_dir, encoders, test_slice, exclude=()):
    """A leave-one-slice-out fold's training slices: every slice but `test_slice` and `exclude` that has features."""
    names = list_slices(data_dir)
    if test_slice not in names:
        raise UserError(f"--test-slice {test_slice}: not a slice of {data_dir} (slices: {', '.join(names[:8])} ...)")
    Features(data_dir, encoders, test_slice).close()     # fails clearly when the test slice has no features
    held_out = {test_slice, *filter(None, exclude)}
    train = [n for n in names if n not in held_out and os.path.isfile(feature_path(data_dir, encoders[0], n))]
    if not train:
        raise UserError(f"{data_dir}: no training slice has {encoders[0]} features; run extract_features.py first")
    return train


def load_fold(data_dir, encoders, test_slice, exclude=(), context=None):
    """One leave-one-slice-out fold's training data: the slices other than `test_slice` and
    `exclude` that have features -> (names, genes, gene_ids, expr X [N, G], features H [N, D],
    dihedral views [N, 8, D] or None). Spots with all-zero expression are dropped (Stem/HINGE).
    With a `context` (fold_context), each spot's features are followed by its neighbourhood's mean."""
    train = training_slices(data_dir, encoders, test_slice, exclude)
    X, H, A = [], [], []
    for n in train:
        s = read_slice(data_dir, n, ("expr", "genes", "gene_ids"))
        f = Features(data_dir, encoders, n)
        keep = s["expr"].sum(1) > 0
        h, a = f.read(), f.read_aug() if f.has_aug else None
        if context:                                      # over every spot of the slide: dropped spots still neighbour
            geom = slice_geometry(data_dir, n)
            h = context_features(h, geom, context, n)
            a = context_features(a, geom, context, n) if a is not None else None
        X.append(s["expr"][keep]); H.append(h[keep])
        A.append(a[keep] if a is not None else None)
        f.close()
    aug = np.concatenate(A) if all(x is not None for x in A) else None
    return train, s["genes"], s["gene_ids"], np.concatenate(X), np.concatenate(H), aug


def split_validation(n, frac=0.1, seed=42):
    """Random spot-level validation split of a fold's training spots (10 %, seed 42, as the official HINGE training code)
    -> (train indices, validation indices)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(frac * n)))
    return perm[n_val:], perm[:n_val]


#################################################################################
#                   Spot geometry and neighbourhood context                     #
#################################################################################

class Geometry(NamedTuple):
    """Where a slice's spots lie, in one unit: µm when the slice states its pixel size, else full-resolution
    pixels, else (no pixel centres) the array grid scaled to one spot pitch."""
    xy: np.ndarray                                       # [N, 2] spot centres
    unit: str                                            # "um", "px" or "grid"
    pitch: float                                         # median distance to the nearest other spot (nan: one spot)
    tile: float                                          # side of a spot's patch (Stem: max(224 px, spot diameter))


def slice_geometry(data_dir, name):
    from scipy.spatial import cKDTree
    with h5py.File(existing_slice(data_dir, name), "r") as s:
        um = float(s.attrs["pixel_size_um"]) if "pixel_size_um" in s.attrs else None
        side = float(s.attrs["patch_px_native"]) if "patch_px_native" in s.attrs else None
        if "pixel" in s:
            xy, unit = s["pixel"][()].astype(np.float64), "px"
            if um:
                xy, unit, side = xy * um, "um", side * um if side else None
        else:                                            # a slice without pixel centres: its spots' grid positions
            col, row = s["array"][()].T.astype(np.float64)
            hexagonal = len(col) > 1 and ((col + row) % 2 == 0).all()  # Visium's array_col steps by 2 along a row
            xy = np.stack([col / 2, row * np.sqrt(3) / 2] if hexagonal else [col, row], 1)
            unit, side = "grid", None
    pitch = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) if len(xy) > 1 else float("nan")
    return Geometry(xy, unit, pitch, side or pitch)      # no patch size known: one pitch


class Context(NamedTuple):
    """--context K: the neighbourhood radius that K nearest spots cover on the training slides, in µm (None when a
    training slide states no pixel size) and in spot pitches (each slide's median nearest-neighbour distance)."""
    k: int
    radius_um: float
    radius_pitch: float


def fold_context(data_dir, encoders, test_slice, exclude, k):
    """The Context of a fold's training slides (None for k = 0). A radius, not a count, carries over to slides
    gridded at another pitch (a virtual-ST grid of prepare_data.py --dataset image): the same tissue area is averaged."""
    from scipy.spatial import cKDTree
    if k < 0:
        raise UserError(f"--context {k}: the number of neighbours must be 0 (off) or more")
    if k == 0:
        return None
    names = training_slices(data_dir, encoders, test_slice, exclude)
    um, pitch = [], []
    for n in names:
        g = slice_geometry(data_dir, n)
        if len(g.xy) > k:
            d = cKDTree(g.xy).query(g.xy, k=k + 1)[0][:, k]  # distance to the K-th other spot
            pitch.append(d / g.pitch)
            um.append(d if g.unit == "um" else None)
    if not pitch:
        raise UserError(f"--context {k}: every training slide has at most {k} spots, so no spot has {k} neighbours; "
                        "choose a smaller K")
    slack = 1.05    # spot centres jitter around a regular grid: the K-th spot's ties must all fall inside the radius
    r_um = slack * float(np.median(np.concatenate(um))) if all(d is not None for d in um) else None
    return Context(k, r_um, slack * float(np.median(np.concatenate(pitch))))


def context_features(features, geom, context, name):
    """Each spot's features followed by the mean features of the other spots of its slide within the context
    radius (≈ its K nearest on training slides) -> [N, ..., 2D]. The radius is in µm when the run and the slide
    both know µm, else in spot pitches. A spot with no other spot inside keeps its own features as its context
    (a slide of one spot, an isolated spot, a grid far coarser than the training slides'), with a note."""
    from scipy import sparse
    from scipy.spatial import cKDTree
    N = len(features)
    if isinstance(context, dict):                        # as a checkpoint stores it
        context = Context(**context)
    use_um = context.radius_um is not None and geom.unit == "um"
    r = context.radius_um if use_um else context.radius_pitch * geom.pitch
    pairs = cKDTree(geom.xy).query_pairs(r, output_type="ndarray") if N > 1 else np.zeros((0, 2), np.int64)
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    adj = sparse.csr_matrix((np.ones(len(i), np.float32), (i, j)), shape=(N, N))
    deg = np.asarray(adj.sum(1)).ravel()
    flat = features.reshape(N, -1)
    ctx = np.asarray(adj @ flat) / np.maximum(deg, 1)[:, None]
    lone = deg == 0
    ctx[lone] = flat[lone]
    if N > 1 and lone.mean() > 0.5:
        unit = f"{r:.0f} µm" if use_um else f"{context.radius_pitch:.2f} spot pitches"
        print(f"note: slice {name}: {lone.mean():.0%} of its spots have no other spot within the context radius "
              f"({unit}; spots here are {geom.pitch:.3g} {geom.unit} apart), so their context is their own features",
              file=sys.stderr)
    elif not use_um and context.radius_um is not None and N > 1:
        print(f"note: slice {name} has no spot positions in µm (no pixel centres or no pixel size); its context radius "
              f"is {context.radius_pitch:.2f} spot pitches", file=sys.stderr)
    return np.concatenate([features, ctx.reshape(features.shape).astype(np.float32)], -1)


class ContextFeatures:
    """A slice's features with each spot's neighbourhood mean appended (--context); the interface of Features.
    The whole slide is held in memory (N x 2D float32): neighbours may lie anywhere in the file's row order."""
    def __init__(self, data_dir, encoders, name, context):
        f = Features(data_dir, encoders, name)
        self.n, self.dim, self.has_aug = f.n, 2 * f.dim, False
        self.H = context_features(f.read(), slice_geometry(data_dir, name), context, name)
        f.close()

    def read(self, start=0, stop=None):                  # -> float32 [n, 2D]
        return self.H[start:stop]

    def close(self):
        pass


def open_features(data_dir, encoders, name, context=None):
    """Features of a slice for prediction, with the run's neighbourhood context when it was trained with one."""
    return ContextFeatures(data_dir, encoders, name, context) if context else Features(data_dir, encoders, name)


def spot_diameter(s, pixel):
    """Spot diameter in full-resolution px: the slice's own, else half the nearest-neighbour spacing."""
    if "spot_diameter_px" in s.attrs:
        return float(s.attrs["spot_diameter_px"])
    from scipy.spatial import cKDTree
    return float(np.median(cKDTree(pixel).query(pixel, k=2)[0][:, 1]) / 2) if len(pixel) > 1 else 1.0


def slice_layout(s):
    """An open slice file's geometry -> (spot centres [N, 2] in full-resolution px, spot diameter
    in px, thumbnail or None, thumbnail px per full-resolution px)."""
    pixel = s["pixel"][()] if "pixel" in s else s["array"][()].astype(np.float32)
    thumb = s["thumbnail"][()] if "thumbnail" in s else None
    scale = float(s["thumbnail"].attrs["scale"]) if thumb is not None else 1.0
    return pixel, spot_diameter(s, pixel), thumb, scale


class PredictionFile:
    """The one writer of prediction files (sample.py, baselines.py) in an open HDF5 file: `pred` and `std`
    [N, G], optionally `samples` float16 [S, N, G] and `steps` [R, N, G], a block of spots at a time (one
    chunk per block), then the spot ids, genes and attributes."""
    def __init__(self, f, N, G, rows, n_samples=0, n_steps=0):
        self.f, rows = f, min(rows, N)
        f.create_dataset("pred", (N, G), np.float32, chunks=(rows, G))
        f.create_dataset("std", (N, G), np.float32, chunks=(rows, G))
        if n_samples:
            f.create_dataset("samples", (n_samples, N, G), np.float16, chunks=(1, rows, G))
        if n_steps:
            f.create_dataset("steps", (n_steps, N, G), np.float32, chunks=(1, rows, G))

    def write(self, start, mean, std, samples=None, steps=None):
        stop = start + len(mean)
        self.f["pred"][start:stop], self.f["std"][start:stop] = mean, std
        if "samples" in self.f:
            self.f["samples"][:, start:stop] = np.asarray(samples).astype(np.float16)
        if "steps" in self.f:
            self.f["steps"][:, start:stop] = steps

    def finish(self, barcodes, genes, **attrs):
        self.f["barcode"], self.f["genes"] = barcodes, str_array(genes)
        self.f.attrs.update(**attrs)


def write_anndata(pred_path, data_dir):
    """<pred>.h5ad beside a prediction file, laid out as scanpy's Visium reader lays out a slide, so
    that `scanpy.pl.spatial(adata, color=GENE)` draws the prediction over the H&E with no argument:
    X = predicted log2(count + 1), layers 'std' (spread over the samples) and 'truth' (when the
    slice has expression), obsm 'spatial' = full-resolution pixel (x, y), uns['spatial'][slice] =
    the thumbnail as the 'hires' image with its scalefactors. anndata writes the file; the [N, G]
    matrices are then copied in block by block, so memory does not grow with the number of spots."""
    import anndata
    import pandas as pd
    name = os.path.basename(pred_path)[:-len(".h5")]
    with h5py.File(pred_path, "r") as f, h5py.File(existing_slice(data_dir, name), "r") as s:
        genes, barcodes = decode(f["genes"]), decode(f["barcode"])
        array = s["array"][()]
        pixel, diameter, thumb, scale = slice_layout(s)
        spatial = {"scalefactors": {"spot_diameter_fullres": diameter}, "metadata": {"source": str(s.attrs.get("source", ""))}}
        if thumb is not None:
            spatial["images"] = {"hires": thumb}
            spatial["scalefactors"]["tissue_hires_scalef"] = scale
        if "pixel_size_um" in s.attrs:
            spatial["metadata"]["pixel_size_um"] = float(s.attrs["pixel_size_um"])
        obs = pd.DataFrame({"in_tissue": 1, "array_row": array[:, 1], "array_col": array[:, 0]}, index=barcodes)
        ad = anndata.AnnData(obs=obs, var=pd.DataFrame(index=genes))
        ad.obsm["spatial"] = pixel.astype(np.float64)
        ad.uns["spatial"] = {name: spatial}
        ad.uns["expression_units"] = "log2(count + 1)"  # the training target of the paper (and Stem)
        ad.uns["prediction"] = {k: v.item() if hasattr(v, "item") else v for k, v in f.attrs.items()}
        matrices = {"X": f["pred"]}
        if "std" in f:
            matrices["layers/std"] = f["std"]
        if "expr" in s and decode(s["genes"]) == genes:
            matrices["layers/truth"] = s["expr"]
        with atomic_path(pred_path + "ad") as tmp:
            ad.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as out:
                for key, src in matrices.items():
                    copy_rows(src, out, key)
    return pred_path + "ad"


def copy_rows(src, out, key, rows=4096):
    """A dense [N, G] matrix into an h5ad file under `key`, as anndata encodes a dense array."""
    dst = out.create_dataset(key, src.shape, np.float32, chunks=(min(rows, src.shape[0]), src.shape[1]))
    for s in range(0, src.shape[0], rows):
        dst[s:s + rows] = src[s:s + rows]
    dst.attrs["encoding-type"], dst.attrs["encoding-version"] = "array", "0.2.0"
