"""A fold's data: leave-one-slice-out training slices, their features, the validation split, and each spot's
neighbourhood on its slide (--context); train.py, baselines.py and the peers share it, so all see the same spots."""
import os
import sys
from typing import NamedTuple

import h5py
import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from common import UserError, existing_slice, list_slices, read_slice


def add_fold_args(p):
    """The arguments that define a leave-one-slice-out fold and its validation split, shared by
    train.py and baselines.py so that both see the same training and validation spots."""
    p.add_argument("--data", required=True, help="folder written by prepare_data.py (with features/)")
    p.add_argument("--features", default="uni,conch",
                   help="encoders to concatenate, in order (default uni,conch = 1536-d)")
    p.add_argument("--test-slice", required=True, help="held-out slice (leave-one-slice-out); never seen in training")
    p.add_argument("--exclude", default="", help="further slices to leave out of training (comma-separated)")
    p.add_argument("--val-frac", type=float, default=0.1, help="share of training spots for validation (default 0.1)")
    p.add_argument("--val-seed", type=int, default=42,
                   help="seed of the validation split (default 42, as the official code)")
    p.add_argument("--context", type=int, default=0, metavar="K",
                   help="append to each spot's features the mean features of its K nearest spots on the same slide; "
                        "on other slides the same radius in µm is used (default 0: off)")


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
    """Random spot-level validation split of a fold's training spots (10 %, seed 42, as the official HINGE training
    code)
    -> (train indices, validation indices)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(frac * n)))
    return perm[n_val:], perm[:n_val]


def feature_stats(H):
    """Per-dimension mean and std of the training features, used to standardise every slice."""
    return H.mean(0), H.std(0) + 1e-6


def training_pixel_size(data_dir, names):
    """Median µm/px of the training slices (None when none states it): the scale the model saw."""
    sizes = []
    for n in names:
        with h5py.File(existing_slice(data_dir, n), "r") as f:
            if "pixel_size_um" in f.attrs:
                sizes.append(float(f.attrs["pixel_size_um"]))
    return float(np.median(sizes)) if sizes else None


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
    gridded at another pitch (a virtual-ST grid of prepare_data.py --dataset image): the same tissue area is
    averaged."""
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
    N = len(features)
    if isinstance(context, dict):                        # as a checkpoint stores it
        context = Context(**context)
    use_um = context.radius_um is not None and geom.unit == "um"
    r = context.radius_um if use_um else context.radius_pitch * geom.pitch
    flat = features.reshape(N, -1)
    lattice = square_lattice(geom.xy)
    if lattice is not None:                              # bins: 5,500 of 8 µm in Her2ST's radius; pairs overflow
        total, deg = lattice_sums(flat, geom.xy, lattice, r)
    else:
        pairs = cKDTree(geom.xy).query_pairs(r, output_type="ndarray") if N > 1 else np.zeros((0, 2), np.int64)
        i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
        adj = sparse.csr_matrix((np.ones(len(i), np.float32), (i, j)), shape=(N, N))
        total, deg = adj @ flat, np.asarray(adj.sum(1)).ravel()
    ctx = np.asarray(total) / np.maximum(deg, 1)[:, None]
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


class Lattice(NamedTuple):
    cells: np.ndarray                                    # [N, 2] int64 grid positions (col, row) from 0
    axes: np.ndarray                                     # [2, 2] one step along a row, along a column, in positions
    slack: float                                         # the farthest a spot lies from its place on that grid


def square_lattice(xy):
    """Spots on a square grid at any rotation, each within 5 % of a step of its place (Visium HD bins, --grid square)
    -> their Lattice; None for any other layout (hexagonal Visium, ST spots found on the image, two spots in a cell)."""
    if len(xy) < 4:
        return None
    j = cKDTree(xy).query(xy, k=2)[1][:, 1]
    step = xy[j] - xy                                    # to the nearest spot: along an axis of a square grid
    turn = np.angle(np.exp(4j * np.arctan2(step[:, 1], step[:, 0])).mean()) / 4   # the axes' angle, mod 90°
    pitch = float(np.median(np.hypot(*step.T)))
    c, s = np.cos(turn), np.sin(turn)
    cells = np.rint((xy - xy[0]) @ np.array([[c, -s], [s, c]]) / pitch)  # off by < 1/2 cell even far from xy[0]
    design = np.c_[cells, np.ones(len(xy))]              # then the affine map cells -> xy, by least squares
    A = np.linalg.lstsq(design, xy, rcond=None)[0]
    slack = float(np.hypot(*(design @ A - xy).T).max())
    cells = (cells - cells.min(0)).astype(np.int64)
    if slack > 0.05 * np.linalg.svd(A[:2], compute_uv=False).min() or \
            len(np.unique(cells[:, 0] * (cells[:, 1].max() + 1) + cells[:, 1])) < len(cells):
        return None
    return Lattice(cells, A[:2], slack)


def lattice_sums(flat, xy, lattice, radius):
    """For each spot of a square grid, the sum of the other spots' rows of `flat` [N, F] within `radius` of its
    position xy, and their count. The grid steps surely inside the radius are one FFT convolution of the grid with
    that disc, whose cost does not grow with the radius; the few steps near the rim are checked spot by spot on the
    true positions, so the result is the plain definition's."""
    from scipy.signal import fftconvolve
    cells, axes, slack = lattice
    margin = 2 * slack + 1e-9 * radius                   # two spots, each up to `slack` off the grid
    R = int(np.ceil((radius + margin) / np.linalg.svd(axes, compute_uv=False).min()))
    d = np.arange(-R, R + 1)
    dcol, drow = np.meshgrid(d, d)                       # [2R+1, 2R+1], indexed [drow + R, dcol + R]
    dist = np.linalg.norm(np.stack([dcol, drow], -1) @ axes, axis=-1)
    sure, rim = dist <= radius - margin, np.abs(dist - radius) < margin
    sure[R, R] = rim[R, R] = False                       # the spot itself is not its context
    col, row = cells.T
    disc = sure.astype(np.float64)
    grid = np.zeros((row.max() + 1, col.max() + 1))
    grid[row, col] = 1
    deg = np.rint(fftconvolve(grid, disc, mode="same")[row, col]).astype(np.float32)
    total = np.empty(flat.shape, np.float32)             # float32 as the pair path's: the output's precision
    chunk = max(1, 2 ** 25 // grid.size)                 # feature columns at a time: ~256 MB of float64 grid
    for c in range(0, flat.shape[1], chunk):
        g = np.zeros(grid.shape + (min(chunk, flat.shape[1] - c),))
        g[row, col] = flat[:, c:c + chunk]
        total[:, c:c + chunk] = fftconvolve(g, disc[..., None], mode="same", axes=(0, 1))[row, col]
    spot = np.full(grid.shape, -1)
    spot[row, col] = np.arange(len(cells))
    for dr, dc in zip(*np.nonzero(rim)):                 # each step gives a spot at most one neighbour
        r2, c2 = row + dr - R, col + dc - R
        i = np.flatnonzero((r2 >= 0) & (r2 < grid.shape[0]) & (c2 >= 0) & (c2 < grid.shape[1]))
        j = spot[r2[i], c2[i]]
        i, j = i[j >= 0], j[j >= 0]
        near = np.linalg.norm(xy[j] - xy[i], axis=1) <= radius
        total[i[near]] += flat[j[near]]
        deg[i[near]] += 1
    return total, deg


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


#################################################################################
#                  Spatial designs: each spot's neighbours (--spatial)          #
#################################################################################

MAX_NEIGHBOURS = 32      # a spot reads at most its 32 nearest within the radius (on a grid finer than training's)


class Neighbours(NamedTuple):
    """Each spot's neighbours on its slide within the run's radius, nearest first (train.py --spatial)."""
    idx: np.ndarray                                      # [N, M] rows of the slide; -1 past the last
    offset: np.ndarray                                   # [N, M, 2] float32, in radii
    weight: np.ndarray                                   # [N, M] float32 distance weights; 0 past the last
    count: np.ndarray                                    # [N] neighbours kept (at most MAX_NEIGHBOURS)


def slide_neighbours(geom, context, name):
    """The spots within the context radius of each spot of one slide (as context_features: in µm when the run and
    the slide both know µm, else in spot pitches). A spot with none reads only its own features (a slide of one
    spot, an isolated spot, a grid much coarser than the training slides'), with a note when that is most of them."""
    if isinstance(context, dict):                        # as a checkpoint stores it
        context = Context(**context)
    N = len(geom.xy)
    use_um = context.radius_um is not None and geom.unit == "um"
    r = context.radius_um if use_um else context.radius_pitch * geom.pitch
    M = max(1, min(MAX_NEIGHBOURS, N - 1))
    if N > 1:
        d, j = cKDTree(geom.xy).query(geom.xy, k=M + 1, distance_upper_bound=r)
        other = (j != np.arange(N)[:, None]) & np.isfinite(d)    # not the spot itself, inside the radius
        keep = np.argsort(~other, axis=1, kind="stable")[:, :M]  # the others first, nearest first
        d, j, other = (np.take_along_axis(v, keep, 1) for v in (d, j, other))
    else:
        d, j, other = np.zeros((N, M)), np.zeros((N, M), np.int64), np.zeros((N, M), bool)
    idx = np.where(other, j, -1).astype(np.int64)
    offset = np.where(other[..., None], geom.xy[np.where(other, j, 0)] - geom.xy[:, None], 0) / r
    # a Gaussian of the distance, σ half the radius: the nearest count most (a choice; the issue names no kernel)
    weight = np.where(other, np.exp(-0.5 * (np.where(other, d, 0) / (r / 2)) ** 2), 0)
    count = other.sum(1)
    if N > 1 and (count == 0).mean() > 0.5:
        unit = f"{r:.0f} µm" if use_um else f"{context.radius_pitch:.2f} spot pitches"
        print(f"note: slice {name}: {(count == 0).mean():.0%} of its spots have no other spot within the spatial "
              f"radius ({unit}; spots here are {geom.pitch:.3g} {geom.unit} apart), so they read only their own "
              "features and generate alone", file=sys.stderr)
    elif N > 1 and (count == M).any() and M == MAX_NEIGHBOURS:
        n_in = cKDTree(geom.xy).query_ball_point(geom.xy[:1000], r, return_length=True).max() - 1
        print(f"note: slice {name}: up to {n_in} spots lie within the spatial radius, far more than on the training "
              f"slides; each spot reads its {M} nearest, a smaller area than the run was trained on", file=sys.stderr)
    return Neighbours(idx, offset.astype(np.float32), weight.astype(np.float32), count)


class SlideSpace(NamedTuple):
    """Slides as the spatial designs read them: every spot's features, its neighbours and its slide's mean."""
    features: np.ndarray                                 # [N, D] raw features
    neighbours: Neighbours                               # rows of `features`
    means: np.ndarray                                    # [n_slides, D] each slide's mean features (the slide token)
    slide: np.ndarray                                    # [N] each spot's slide


def slide_space(data_dir, encoders, name, context):
    """A slide's SlideSpace (sample.py, for a run trained with --spatial); its features are held in memory."""
    f = Features(data_dir, encoders, name)
    H = f.read()
    f.close()
    nb = slide_neighbours(slice_geometry(data_dir, name), context, name)
    return SlideSpace(H, nb, H.mean(0, keepdims=True), np.zeros(len(H), np.int64))


def pad_columns(arrays, M, value):
    """Arrays [N_i, M_i, ...] padded with `value` to M columns and stacked -> [sum N_i, M, ...]."""
    return np.concatenate([np.pad(a, [(0, 0), (0, M - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=value)
                           for a in arrays])


def fold_space(data_dir, names, encoders, context):
    """The training slides of a fold as one SlideSpace (neighbour rows offset slide by slide) -> (SlideSpace,
    kept [N_all] bool: the rows load_fold keeps, in its order). Every spot is a row: spots with no expression
    still neighbour."""
    H, idx, offset, weight, count, means, slide, kept = [], [], [], [], [], [], [], []
    start = 0
    for i, n in enumerate(names):
        f = Features(data_dir, encoders, n)
        h = f.read()
        f.close()
        nb = slide_neighbours(slice_geometry(data_dir, n), context, n)
        idx.append(np.where(nb.idx >= 0, nb.idx + start, -1))
        offset.append(nb.offset), weight.append(nb.weight), count.append(nb.count)
        H.append(h), means.append(h.mean(0)), slide.append(np.full(len(h), i))
        kept.append(read_slice(data_dir, n, ("expr",))["expr"].sum(1) > 0)
        start += len(h)
    M = max(a.shape[1] for a in idx)
    nb = Neighbours(pad_columns(idx, M, -1), pad_columns(offset, M, 0), pad_columns(weight, M, 0),
                    np.concatenate(count))
    return SlideSpace(np.concatenate(H), nb, np.stack(means), np.concatenate(slide)), np.concatenate(kept)


def renumber(idx, rows, n):
    """The neighbour rows idx[rows] ([len(rows), M], -1 past the last) of a slide of n spots, renumbered as
    positions within `rows`; -1 for a neighbour outside them."""
    local = np.full(n, -1)
    local[rows] = np.arange(len(rows))
    nb = idx[rows]
    return np.where(nb >= 0, local[np.maximum(nb, 0)], -1)


def sub_space(space, rows):
    """The spots `rows` of a SlideSpace as a SlideSpace of their own (neighbours outside them dropped, their
    count kept): the validation spots and their neighbours that a spatial run keeps to calibrate on."""
    nb = space.neighbours
    idx = renumber(nb.idx, rows, len(space.features))
    inside = idx >= 0
    return SlideSpace(space.features[rows], Neighbours(idx, np.where(inside[..., None], nb.offset[rows], 0),
                                                       np.where(inside, nb.weight[rows], 0), nb.count[rows]),
                      space.means, space.slide[rows])
