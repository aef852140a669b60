"""What every slide-context peer shares: a fold's whole slides, their spot positions and neighbours, the
training loop with early stopping on the validation spots, and `fit`, which turns a Peer class into a predictor.

Only the training spots' expression is ever an input or a target while a peer trains; the validation spots
(the 10 % that folds.split_validation draws, mapped back to their slides) choose the epoch, and their
expression enters nothing else.
"""
import contextlib
import copy
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm import tqdm

from common import UserError, read_slice
from folds import Features, feature_stats, slice_geometry, split_validation, training_slices

CHUNK = 512                                              # centre spots (16x as many edges) per block: memory stays flat
BLOCK = 1024                                             # feature rows read from disk at a time for a slide to predict


#################################################################################
#                                    Slides                                     #
#################################################################################

@dataclass
class Slide:
    """One slide, whole: every spot's features, and for a training slide its expression with the
    spots a model may learn from (`target`) and the validation spots (`val`) marked."""
    name: str
    feats: object                                        # [N, D] standardised with the training statistics: a tensor,
                                                         # or SlideFeatures (on disk) for a slide to predict
    geom: object                                         # folds.Geometry: centres, unit, pitch, patch side
    array: np.ndarray                                    # [N, 2] grid position (col, row)
    expr: torch.Tensor = None                            # [N, G] log2(count + 1); None on a slide to predict
    target: torch.Tensor = None                          # [N] bool: training spots, the only expression trained on
    val: torch.Tensor = None                             # [N] bool: validation spots

    def __len__(self):
        return len(self.feats)


def fold_slides(data_dir, encoders, test_slice, exclude, val_frac, seed, dev):
    """A fold's training slides with load_fold's spots in load_fold's order (all-zero spots dropped, slides
    concatenated), so that split_validation draws the very validation spots every other method holds out
    -> (slides, genes, feature mean, feature std)."""
    names = training_slices(data_dir, encoders, test_slice, exclude)
    raw = []
    for n in names:
        s = read_slice(data_dir, n, ("expr", "genes", "array"))
        f = Features(data_dir, encoders, n)
        raw.append((n, f.read(), s))
        f.close()
    keep = [s["expr"].sum(1) > 0 for _, _, s in raw]
    n_kept = int(sum(k.sum() for k in keep))
    tr, val = split_validation(n_kept, val_frac, seed)
    if len(tr) < 2:
        raise UserError(f"only {n_kept} training spots with expression in {data_dir}: too few to fit and validate")
    is_val = np.zeros(n_kept, bool)
    is_val[val] = True
    mu, sd = feature_stats(np.concatenate([h[k] for (_, h, _), k in zip(raw, keep)]))  # as baselines.py: kept spots
    slides, offset = [], 0
    for (n, h, s), k in zip(raw, keep):
        rows = np.flatnonzero(k)
        v = np.zeros(len(k), bool)
        v[rows[is_val[offset:offset + len(rows)]]] = True
        offset += len(rows)
        slides.append(Slide(n, torch.from_numpy((h - mu) / sd).float().to(dev), slice_geometry(data_dir, n), s["array"],
                            torch.from_numpy(s["expr"]).float().to(dev), torch.from_numpy(k & ~v).to(dev),
                            torch.from_numpy(v).to(dev)))
    return slides, s["genes"], mu, sd


class SlideFeatures:
    """A slide's features left on disk, standardised as in training when read, block by block: a 50k-spot slide's
    1536-d features are 300 MB, so a peer keeps only its narrow projections of them (by_rows)."""
    def __init__(self, data_dir, encoders, name, mu, sd, dev):
        f = Features(data_dir, encoders, name)         # opened here too: a missing or mismatched file fails at once
        self.n = f.n
        f.close()
        self.source, self.mu, self.sd, self.dev = (data_dir, encoders, name), mu, sd, dev

    def __len__(self):
        return self.n

    def blocks(self):                                    # -> float32 tensors [≤ BLOCK, D], in row order
        f = Features(*self.source)
        try:
            for s in range(0, self.n, BLOCK):
                yield torch.from_numpy((f.read(s, s + BLOCK) - self.mu) / self.sd).float().to(self.dev)
        finally:
            f.close()


def by_rows(feats, fn):
    """fn of every spot's features -> [N, ·]: a training slide's tensor at once, a slide on disk block by block."""
    if torch.is_tensor(feats):
        return fn(feats)
    out, s = None, 0
    for b in feats.blocks():
        y = fn(b)
        if out is None:                                  # filled in place: no list of blocks beside the result
            out = y.new_empty(len(feats), *y.shape[1:])
        out[s:s + len(y)] = y
        s += len(y)
    return out


def load_slide(data_dir, encoders, name, mu, sd, dev):
    """A slide to predict: its features (on disk, standardised as in training) and geometry; no expression is read."""
    array = read_slice(data_dir, name, ("array",))["array"]
    return Slide(name, SlideFeatures(data_dir, encoders, name, mu, sd, dev), slice_geometry(data_dir, name), array)


def training_pitch_um(slides):
    """The training slides' median spot pitch in µm (None when one states no pixel size): the length unit
    of positions, so that one model serves slides scanned at any resolution."""
    if any(s.geom.unit != "um" for s in slides):
        return None
    return float(np.median([s.geom.pitch for s in slides if np.isfinite(s.geom.pitch)] or [1.0]))


def check_pitch(slide, slides):
    """A slide gridded far coarser or finer than the training slides is predicted as is, with a note: the peers'
    neighbourhoods (8 nearest spots, 5 x 5 patch-sized tiles, the graph) then reach other distances than in training."""
    pitch = training_pitch_um(slides)
    if pitch and slide.geom.unit == "um" and np.isfinite(slide.geom.pitch) and \
            not 0.5 <= slide.geom.pitch / pitch <= 2:
        print(f"note: slide {slide.name}: spots {slide.geom.pitch:.0f} µm apart, {slide.geom.pitch / pitch:.2g}x the "
              f"training slides' {pitch:.0f} µm; its neighbourhoods span other distances than the model learnt from",
              file=sys.stderr)


def positions(slide, pitch_um):
    """Spot centres in training spot pitches: µm / the training pitch, else (no µm) the slide's own pitches."""
    if pitch_um and slide.geom.unit == "um":
        return slide.geom.xy / pitch_um
    return slide.geom.xy / (slide.geom.pitch if np.isfinite(slide.geom.pitch) else 1.0)


def per_slide(cache, slide, build):
    """What `build` makes of a slide (its graph, tiles, grid), made once per slide object: the training slides'
    are reused every epoch; another slide of the same name is another slide."""
    if cache.get(slide.name, (None,))[0] is not slide:
        cache[slide.name] = (slide, build())
    return cache[slide.name][1]


def knn(xy, k):
    """The k nearest other spots of every spot -> (indices [N, k'], valid [N, k']), k' = max(1, min(k, N - 1));
    a KD-tree, never an N x N matrix. Spots of a slide with fewer than k + 1 spots take all the others."""
    n, kk = len(xy), min(k, len(xy) - 1)
    if kk < 1:
        return np.zeros((n, 1), np.int64), np.zeros((n, 1), bool)
    idx = cKDTree(xy).query(xy, k=kk + 1)[1]
    is_self = idx == np.arange(n)[:, None]               # usually column 0; not always when two spots coincide
    idx = np.take_along_axis(idx, np.argsort(is_self, axis=1, kind="stable"), 1)[:, :kk]
    return idx.astype(np.int64), np.ones((n, kk), bool)


#################################################################################
#                               Training loop                                   #
#################################################################################

@dataclass
class Budget:
    epochs: int                                          # at most this many epochs
    patience: int                                        # early stop after this many epochs without a lower val MSE
    seconds: float = 0                                   # stop after the epoch that passes this wall time (0 = none,
                                                         # the default; a benchmark never sets it)


class Peer:
    """A trainer: `steps()` yields the loss of each optimiser step of one epoch (`n_steps` of them); `predict`
    gives a slide's mean [N, G] and samples [S, N, G] (None for a point predictor). A subclass declares its
    paper's budget, EPOCHS and PATIENCE, and GENERATIVE if it draws samples (--samples; their spread is its std)."""
    EPOCHS: int                                          # at most this many epochs (--epochs replaces it)
    PATIENCE: int                                        # early stop after this many epochs without a lower val MSE
    GENERATIVE = False                                   # False: a point predictor, std = residual_std (as ridge)

    def epoch(self):
        return float(np.mean(list(self.steps())))

    def after_epoch(self, val):
        pass


def validation_mse(peer, slides):
    """MSE over every validation spot of the training slides, each slide predicted whole (no expression in)."""
    err, n = 0.0, 0
    for s in slides:
        if s.val.any():
            mean, _ = peer.predict(s, 1, seed=1234)      # one fixed draw for a generative peer: comparable epochs
            err += float(((mean[s.val] - s.expr[s.val]) ** 2).sum())
            n += int(s.val.sum()) * s.expr.shape[1]
    return err / n


def train(peer, slides, budget, desc):
    """Epochs until `budget` runs out or validation MSE stops falling; the best epoch's weights are kept."""
    t0 = time.time()
    best, best_epoch = validation_mse(peer, slides), 0   # epoch 0: the untrained model
    best_state, stop, ep, loss = copy.deepcopy(peer.net.state_dict()), "epochs", 0, float("nan")
    bar = tqdm(range(1, budget.epochs + 1), desc=desc, unit="epoch")
    for ep in bar:
        peer.net.train()
        loss = peer.epoch()
        peer.net.eval()
        v = validation_mse(peer, slides)
        peer.after_epoch(v)
        if v < best:
            best, best_epoch, best_state = v, ep, copy.deepcopy(peer.net.state_dict())
        bar.set_postfix(train=f"{loss:.3f}", val=f"{v:.3f}", best=best_epoch)
        if ep - best_epoch >= budget.patience:
            stop = "early stop"
            break
        if budget.seconds and time.time() - t0 > budget.seconds:
            stop = "time budget"
            break
    bar.close()
    peer.net.load_state_dict(best_state)
    return {"epochs": ep, "best_epoch": best_epoch, "val_mse": best, "train_loss": loss, "stop": stop,
            "train_seconds": time.time() - t0}


def start_at_mean(heads, slides):
    """Gene heads start at the training mean of each gene (not in the papers; as baselines.py's MLP): a short
    CPU budget is not spent climbing from 0 to the mean level."""
    mean = torch.cat([s.expr[s.target] for s in slides]).mean(0)
    with torch.no_grad():
        for head in heads:
            head.bias.copy_(mean)


def residual_std(peer, slides):
    """Per gene, the root mean squared error on the validation spots: the std of a Gaussian residual (as ridge)."""
    sq, n = 0.0, 0
    for s in slides:
        if s.val.any():
            sq = sq + ((peer.predict(s, 1)[0][s.val] - s.expr[s.val]) ** 2).sum(0)
            n += int(s.val.sum())
    return (sq / n).sqrt()


#################################################################################
#                                   Fitting                                     #
#################################################################################

@contextlib.contextmanager
def deterministic(dev):
    """torch's deterministic kernels on a CPU, the previous setting restored after. With more than one thread the
    backward pass of an indexing (x[idx]: every peer gathers its neighbours so) adds the gradients of repeated
    indices with atomic float adds in whatever order the threads get there, so the same command gave other
    predictions from run to run (after three epochs on the demo, by 1e-6 for STFlow and TRIPLEX and 6e-3 for
    MERGE); the serial kernel makes runs at one thread count bit-identical, whatever else the machine is doing
    (tests/test_reproducible.py). A GPU keeps torch's defaults: some of its kernels have no deterministic form."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(before[0] or dev.type == "cpu", warn_only=before[1])
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def fit(peer_class, slides, G, a, dev):
    """Train a peer (a Peer subclass) on a fold's slides -> (predict: Slide -> (mean [N, G], std [N, G], samples
    [S, N, G] or None) as numpy, the training record). Early stop on validation MSE for every peer (STFlow and
    TRIPLEX select by validation PCC, MERGE does not select); --epochs / --patience replace the class's own.
    The budget is epochs, never wall time unless a.budget_s asks for it, so a run is the same on any load."""
    with deterministic(dev):
        torch.manual_seed(a.seed)
        peer = peer_class(slides, G, a, dev)
        budget = Budget(a.epochs or peer.EPOCHS, a.patience or peer.PATIENCE, a.budget_s)
        record = train(peer, slides, budget, peer_class.__name__.lower())
        peer.net.eval()
        std = None if peer.GENERATIVE else residual_std(peer, slides)

    @deterministic(dev)
    def predict(slide):
        check_pitch(slide, slides)
        mean, samples = peer.predict(slide, a.samples if peer.GENERATIVE else 1, a.seed)
        if samples is None:                              # a point predictor: a Gaussian per gene, as ridge
            return mean.cpu().numpy(), std.expand_as(mean).cpu().numpy(), None
        spread = samples.std(0, correction=1 if len(samples) > 1 else 0)   # as sample.py
        return mean.cpu().numpy(), spread.cpu().numpy(), samples.cpu().numpy()
    return predict, record
