"""The paper's slide-context peers, reimplemented on frozen spot features: STFlow (ICML 2025), TRIPLEX
(CVPR 2024) and MERGE (CVPR 2025). baselines.py runs them on the same folds, validation spots and
prediction format as every other method (README, "Quality benchmark"):

    python baselines.py --data data/her2st --features stain --test-slice C2 --method stflow --out runs/q/stflow/pred

Each model sees whole slides: every spot's features serve as context, but only the training spots'
expression is ever an input or a target while it trains; the validation spots (the 10 % that
common.split_validation draws, mapped back to their slides) choose the epoch, and their
expression enters nothing else. Where a model needs pixels (TRIPLEX's and MERGE's trainable
ResNet-18) it takes the spot's frozen features instead; each such change is one comment at its line.
"""
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from scipy.spatial import cKDTree
from tqdm import tqdm

from common import (Features, UserError, feature_stats, read_slice, slice_geometry, split_validation,
                    training_slices)
from model import timestep_embedding

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
    geom: object                                         # common.Geometry: centres, unit, pitch, patch side
    array: np.ndarray                                    # [N, 2] grid position (col, row)
    expr: torch.Tensor = None                            # [N, G] log2(count + 1); None on a slide to predict
    target: torch.Tensor = None                          # [N] bool: training spots, the only expression seen in training
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
        f = Features(data_dir, encoders, name)         # opened here too: a missing or mismatched file fails before any work
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
    patience: int                                        # early stop after this many epochs without a lower validation MSE
    seconds: float                                       # stop after the epoch that passes this wall time (0 = none)


class Peer:
    """A trainer: `steps()` yields the loss of each optimiser step of one epoch (`n_steps` of them); `predict`
    gives a slide's mean [N, G] and samples [S, N, G] (None for a point predictor)."""
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
#                           STFlow (ICML 2025)                                  #
#################################################################################

@dataclass
class Graph:
    nbr: torch.Tensor                                    # [N, k] neighbour indices
    valid: torch.Tensor                                  # [N, k] bool
    frames: torch.Tensor                                 # [4, N, k, 3] framed offsets and distance


def frame_offsets(xy, nbr, valid):
    """E(2)-invariant edge inputs by frame averaging (STFlow): each spot's offsets to its neighbours in the PCA
    frame of those offsets, under the 4 sign choices of its two axes, with their length -> [4, N, k, 3]."""
    rel = (xy[nbr] - xy[:, None]) * valid[..., None]     # [N, k, 2]
    cov = torch.einsum("nki,nkj->nij", rel, rel) / valid.sum(1).clamp(min=1)[:, None, None]
    axes = torch.linalg.eigh(cov + 1e-6 * torch.eye(2, device=xy.device))[1]  # [N, 2, 2], columns = principal axes
    signs = torch.tensor([[1., 1.], [1., -1.], [-1., 1.], [-1., -1.]], device=xy.device)
    framed = torch.einsum("nki,nij->nkj", rel, axes)[None] * signs[:, None, None]  # [4, N, k, 2]
    return torch.cat([framed, rel.norm(dim=-1)[None, ..., None].expand(4, -1, -1, 1)], -1)


def spatial_graph(xy, k, dev):
    nbr, valid = knn(xy, k)
    nbr, valid = torch.from_numpy(nbr).to(dev), torch.from_numpy(valid).to(dev)
    return Graph(nbr, valid, frame_offsets(torch.from_numpy(xy).float().to(dev), nbr, valid))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.w12, self.w3, self.drop = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, -1)
        return self.drop(self.w3(F.silu(a) * b))


class STFlowLayer(nn.Module):
    """Attention over each spot's k nearest spots: logit = MLP([q_i, k_j, e_ij, g_j − g_i]) per head, where g is
    the noisy expression (it enters only here), then a SwiGLU MLP; a gene head reads every layer (STFlow)."""
    def __init__(self, dim, heads, genes, dropout):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim)
        self.edge = nn.Sequential(nn.Linear(3, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.logit = nn.Sequential(nn.Linear(3 * dim + genes, dim), nn.SiLU(), nn.Linear(dim, heads))
        self.attn_drop, self.proj, self.drop = nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout)
        self.norm2, self.ffn = nn.LayerNorm(dim), SwiGLU(dim, 4 * dim, dropout)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Dropout(dropout),
                                  nn.Linear(dim, genes), nn.ReLU())

    def forward(self, h, g, graph, x1_sum):              # h [N, W], g [N, G] -> h [N, W]; adds its x̂1 [N, G] to x1_sum
        N, W = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, -1)
        hs = h.new_empty(N, W)
        for s in range(0, N, CHUNK):                     # blocks of centre spots: edge and FFN tensors stay [CHUNK, ·]
            nbr, valid = graph.nbr[s:s + CHUNK], graph.valid[s:s + CHUNK]
            n, kk = nbr.shape
            e = self.edge(graph.frames[:, s:s + CHUNK]).mean(0)   # [n, k, W], averaged over the 4 frames
            z = torch.cat([q[s:s + CHUNK, None].expand(-1, kk, -1), k[nbr], e, g[nbr] - g[s:s + CHUNK, None]], -1)
            att = torch.softmax(self.logit(z).masked_fill(~valid[..., None], -1e9), 1) * valid[..., None]  # [n, k, H]
            att = self.attn_drop(att)
            msg = torch.einsum("nkh,nkhd->nhd", att, v[nbr].view(n, kk, self.heads, -1)).reshape(n, W)
            hc = h[s:s + CHUNK] + self.drop(self.proj(msg))
            hc = hc + self.ffn(self.norm2(hc))
            hs[s:s + CHUNK] = hc
            x1_sum[s:s + CHUNK] += self.head(hc)
        return hs


class STFlowNet(nn.Module):
    def __init__(self, feat_dim, genes, dim=128, layers=4, heads=4, dropout=0.2):
        super().__init__()
        self.embed = nn.Linear(feat_dim, dim)
        self.time = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList([STFlowLayer(dim, heads, genes, dropout) for _ in range(layers)])

    def forward(self, emb, g, t, graph):                # emb [N, W] = embed(features), g [N, G], t scalar -> x̂1 [N, G]
        # t x 1000: the 256-d sinusoid then spans [0, 1] as DiT's spans 1000 steps (the scale is not stated)
        h = emb + self.time(timestep_embedding(torch.tensor([1000.0 * t], device=emb.device)))
        total = torch.zeros_like(g)                      # summed in place: a whole slide's [N, G] is the largest tensor
        for layer in self.layers:
            h = layer(h, g, graph, total)
        return total.div_(len(self.layers))              # the mean of the per-layer gene heads


def zinb_prior(shape, gen, dev):
    """STFlow's prior: counts ~ ZINB(total count 1, logits 0.1, zero-inflation logit 0), in log2(count + 1) units
    (STFlow takes log1p; our targets are log2(count + 1)). NB(1, logits l) = Poisson(e^l · Exp(1))."""
    rate = torch.empty(shape, device=dev).exponential_(generator=gen).mul_(math.exp(0.1))
    counts = torch.poisson(rate, generator=gen)
    del rate                                             # in place from here: a whole slide's [N, G] is the largest tensor
    return counts.mul_(torch.rand(shape, device=dev, generator=gen) >= 0.5).add_(1).log2_()


class STFlow(Peer):
    """Flow matching over whole slides (STFlow): x_t = (1 − t)·x0 + t·x1 with the ZINB prior x0; the network
    predicts x1 (MSE); sampling = Euler on t = linspace(0.01, 1, 5), the fourth prediction is the output."""
    K, CHUNKS_PER_SLIDE, BATCH = 8, 10, 2
    MAX_CHUNK = 5000                                     # ours: a Visium slide (4,992 spots) trains as published, a larger
                                                         # one in chunks this size (uncapped, a 50k-spot step outgrew 16 GiB)

    def __init__(self, slides, G, a, dev):
        self.dev, self.G, self.pitch_um = dev, G, training_pitch_um(slides)
        self.net = STFlowNet(slides[0].feats.shape[1], G).to(dev)   # 128 wide, 4 layers, 4 heads: the paper's, CPU or not
        start_at_mean([layer.head[-2] for layer in self.net.layers], slides)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=5e-4)
        self.gen = torch.Generator(dev).manual_seed(a.seed)
        self.rng = np.random.default_rng(a.seed)
        self.graphs = {}
        # the training graph holds the training spots only: a validation neighbour would bring its expression in as
        # g_j − g_i (their features still count: they are part of every whole-slide prediction)
        self.pools = []
        for s in slides:
            rows = torch.nonzero(s.target).squeeze(1).cpu().numpy()
            if len(rows) >= 2:
                xy = positions(s, self.pitch_um)[rows]
                self.pools.append((s, rows, xy, cKDTree(xy)))
        if not self.pools:
            raise UserError("stflow trains on chunks of a slide's training spots: no training slide has 2 of them")

    def graph(self, slide):
        return per_slide(self.graphs, slide, lambda: spatial_graph(positions(slide, self.pitch_um), self.K, self.dev))

    def chunk(self, pool):
        """A random centre and its ⌊N·u⌋ nearest training spots (at least 2, at most MAX_CHUNK), u ~ U(0, 1) (STFlow)."""
        s, rows, xy, tree = pool
        n = min(len(rows), self.MAX_CHUNK, max(2, int(len(rows) * self.rng.random())))
        idx = np.sort(tree.query(xy[self.rng.integers(len(rows))], k=n)[1])
        return s, rows[idx], xy[idx]

    @property
    def n_steps(self):
        return -(-len(self.pools) * self.CHUNKS_PER_SLIDE // self.BATCH)

    def steps(self):
        """10 chunks per slide, 2 per step (STFlow)."""
        items = [self.chunk(p) for p in self.pools for _ in range(self.CHUNKS_PER_SLIDE)]
        self.rng.shuffle(items)
        for b in range(0, len(items), self.BATCH):
            self.opt.zero_grad(set_to_none=True)
            sq, n = 0.0, 0
            for s, rows, xy in items[b:b + self.BATCH]:
                rows = torch.from_numpy(rows).to(self.dev)
                x1 = s.expr[rows]
                t = float(torch.rand((), generator=self.gen, device=self.dev))  # one t per chunk
                xt = (1 - t) * zinb_prior(x1.shape, self.gen, self.dev) + t * x1
                pred = self.net(self.net.embed(s.feats[rows]), xt, t, spatial_graph(xy, self.K, self.dev))
                sq, n = sq + ((pred - x1) ** 2).sum(), n + x1.numel()
            loss = sq / n                                # MSE over every spot of the batch's chunks
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            yield loss.item()

    @torch.no_grad()
    def predict(self, slide, n_samples=1, seed=0):
        """Whole slide, S samples from different priors -> (mean [N, G], samples [S, N, G])."""
        graph, gen = self.graph(slide), torch.Generator(self.dev).manual_seed(seed)
        emb = by_rows(slide.feats, self.net.embed)       # once for every step and sample
        ts = torch.linspace(0.01, 1, 5).tolist()
        samples = torch.empty(n_samples, len(slide), self.G, device=self.dev)
        for s in range(n_samples):
            x = zinb_prior((len(slide), self.G), gen, self.dev)
            for i in range(3):                           # x += dt·(x̂1 − x)/(1 − t), in place: one [N, G] besides x
                x.add_(self.net(emb, x, ts[i], graph).sub_(x), alpha=(ts[i + 1] - ts[i]) / (1 - ts[i]))
            samples[s] = self.net(emb, x, ts[3], graph)
            del x
        return samples.mean(0), samples


#################################################################################
#                           TRIPLEX (CVPR 2024)                                 #
#################################################################################

class FeedForward(nn.Sequential):
    def __init__(self, dim, hidden, dropout):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


class Attention(nn.Module):
    """Multi-head attention, x's queries over kv's keys (kv = x: self-attention); `bias` [B or 1, H, n, m] is
    added to the logits. No dropout on the attention weights (TRIPLEX's plain-torch path has none), so SDPA
    takes its memory-efficient kernel where there is no bias: a 50k-spot slide never allocates N x N."""
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.q, self.kv = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x, kv, bias=None):                 # x [B, n, W], kv [B, m, W] -> [B, n, W]
        B, n, W = x.shape
        q = self.q(x).view(B, n, self.heads, -1).transpose(1, 2)
        k, v = (t.view(B, kv.shape[1], self.heads, -1).transpose(1, 2) for t in self.kv(kv).chunk(2, -1))
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, n, W))


class Block(nn.Module):
    """Pre-norm transformer block; with `kv` the queries attend to another token set (normed by the same LN)."""
    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2, self.ff = nn.LayerNorm(dim), FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x, kv=None, bias=None):
        xn = self.norm1(x)
        x = x + self.attn(xn, xn if kv is None else self.norm1(kv), bias)
        return x + self.ff(self.norm2(x))


def tile_neighbours(geom, grid=5):
    """TRIPLEX's 5 x 5 tiles of the spot's patch size around each spot; a tile takes the embedding of the
    nearest spot within half a tile of its centre (our features are per spot, not per tile) -> (spot index
    [N, 25], valid [N, 25]), row-major over (dy, dx)."""
    N, half = len(geom.xy), grid // 2
    d = np.arange(-half, half + 1) * geom.tile
    offsets = np.stack(np.meshgrid(d, d, indexing="ij")[::-1], -1).reshape(-1, 2)   # (dx, dy), dy outer
    centres = (geom.xy[:, None] + offsets[None]).reshape(-1, 2)
    dist, idx = cKDTree(geom.xy).query(centres, distance_upper_bound=geom.tile / 2)
    valid = np.isfinite(dist).reshape(N, -1)
    idx = np.where(valid, idx.reshape(N, -1), 0)
    valid[:, grid * grid // 2] = True                    # the centre tile is the spot itself
    idx[:, grid * grid // 2] = np.arange(N)
    return idx, valid


class APEG(nn.Module):
    """TRIPLEX's positional encoding: tokens placed on the 2-D array grid (spots sharing a cell averaged), a
    depthwise 3 x 3 convolution, read back at each spot's cell (the convolution's output replaces the token).
    Gathered over each cell's 8 neighbours instead of a dense grid, so memory follows the spots, not the grid."""
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    @staticmethod
    def cells(array):
        """-> (cell of each spot [N], the cells at the 9 offsets of each cell [C, 9] (C = none), number of cells)."""
        a = array.astype(np.int64) - array.min(0) + 1
        width = int(a[:, 1].max()) + 2
        keys, inverse = np.unique(a[:, 0] * width + a[:, 1], return_inverse=True)
        col, row = keys // width, keys % width
        nb = []
        for dy in (-1, 0, 1):                            # kernel row = row offset, kernel column = col offset
            for dx in (-1, 0, 1):
                want = (col + dx) * width + row + dy
                pos = np.clip(np.searchsorted(keys, want), 0, len(keys) - 1)
                nb.append(np.where(keys[pos] == want, pos, len(keys)))
        return inverse.ravel(), np.stack(nb, 1), len(keys)

    def forward(self, x, cells):                         # x [N, W] -> [N, W]
        inverse, nb, C = cells
        cell = torch.zeros(C + 1, x.shape[1], device=x.device).index_add(0, inverse, x)
        count = torch.zeros(C + 1, device=x.device).index_add(0, inverse, torch.ones_like(inverse, dtype=x.dtype))
        cell = cell / count.clamp(min=1)[:, None]        # row C stays 0: the padding of an empty cell
        w = self.conv.weight.view(x.shape[1], 9)
        out = self.conv.bias.expand(C, -1).clone()
        for o in range(9):
            out = out + cell[nb[:, o]] * w[:, o]
        return out[inverse]


class TriplexNet(nn.Module):
    def __init__(self, feat_dim, genes, dim, depth, heads, mlp_ratio, dropout):
        super().__init__()
        fusion, glob, neigh = 0, 1, 2
        # each branch projects the frozen features to its width (TRIPLEX's inputs are the width already)
        self.target_in, self.neigh_in, self.global_in = (nn.Linear(feat_dim, dim) for _ in range(3))
        self.global1 = Block(dim, heads[glob], mlp_ratio, dropout[glob])
        self.apeg = APEG(dim)
        self.global2 = nn.ModuleList([Block(dim, heads[glob], mlp_ratio, dropout[glob]) for _ in range(depth[glob] - 1)])
        self.global_norm = nn.LayerNorm(dim)
        self.neigh = nn.ModuleList([Block(dim, heads[neigh], mlp_ratio, dropout[neigh]) for _ in range(depth[neigh])])
        self.neigh_norm = nn.LayerNorm(dim)
        offsets = np.array([(abs(r1 - r2), abs(c1 - c2)) for r1 in range(5) for c1 in range(5) for r2 in range(5)
                            for c2 in range(5)])
        self.register_buffer("bias_idx", torch.from_numpy(offsets[:, 0] * 5 + offsets[:, 1]).view(25, 25), persistent=False)
        self.neigh_bias = nn.ParameterList([nn.Parameter(torch.zeros(heads[neigh], 25)) for _ in range(depth[neigh])])
        self.fusion = nn.ModuleList([Block(dim, heads[fusion], mlp_ratio, dropout[fusion]) for _ in range(depth[fusion])])
        self.fusion_norm = nn.LayerNorm(dim)
        self.fc, self.fc_target, self.fc_neigh, self.fc_global = (nn.Linear(dim, genes) for _ in range(4))

    def project(self, feats):                            # feats [N, D] -> [N, 3, W]: each branch's token of every spot
        return torch.stack([self.target_in(feats), self.neigh_in(feats), self.global_in(feats)], 1)

    def encode_global(self, x, cells):                   # x [N, W] global tokens -> [N, W]: every spot attends to every other
        x = self.global1(x[None])[0]
        x = self.apeg(x, cells)[None]
        for blk in self.global2:
            x = blk(x)
        return self.global_norm(x[0])

    def forward(self, t, n, valid, g):                   # tokens t [B, W], n [B, 25, W], valid [B, 25], g [B, W] -> 4 x [B, G]
        mask = torch.zeros(valid.shape, device=t.device).masked_fill(~valid, -1e4)[:, None, None]  # [B, 1, 1, 25]
        for blk, table in zip(self.neigh, self.neigh_bias):
            n = blk(n, bias=table[:, self.bias_idx][None] + mask)   # learned bias per head and (|Δrow|, |Δcol|)
        n = self.neigh_norm(n)
        t = t[:, None]                                   # [B, 1, W]: one token from the spot's features (TRIPLEX: a ResNet-18's 7 x 7 on pixels)
        f1, f2 = g[:, None], g[:, None]                  # the global token queries both, one weight-shared encoder
        for blk in self.fusion:
            f1, f2 = blk(f1, t), blk(f2, n, mask)
        fused = self.fusion_norm((f1 + f2)[:, 0])
        return [torch.clamp(head(x), 0) for head, x in ((self.fc, fused), (self.fc_target, t.mean(1)),
                                                        (self.fc_neigh, n.mean(1)), (self.fc_global, g))]


class Triplex(Peer):
    """TRIPLEX: target, neighbour and global branches fused by cross-attention; loss MSE(fused) +
    Σ_branch [0.7·MSE(branch) + 0.3·MSE(fused, branch)]; only the fused output predicts."""
    BATCH, ALPHA = 128, 0.3

    def __init__(self, slides, G, a, dev):
        self.dev = dev
        if a.size == "paper":                            # TRIPLEX's Her2ST (andersson) config: fusion, global, neighbour
            cfg = dict(dim=1024, depth=(2, 2, 4), heads=(8, 16, 16), mlp_ratio=2, dropout=(0.15, 0.1, 0.1))
        else:                                            # CPU: width 1024 -> 128, heads so that each stays 32 wide
            cfg = dict(dim=128, depth=(2, 2, 4), heads=(4, 4, 4), mlp_ratio=2, dropout=(0.15, 0.1, 0.1))
        self.net = TriplexNet(slides[0].feats.shape[1], G, **cfg).to(dev)
        start_at_mean([self.net.fc, self.net.fc_target, self.net.fc_neigh, self.net.fc_global], slides)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=0.1, patience=10)
        self.rng = np.random.default_rng(a.seed)
        self.slides, self.prep = slides, {}

    def prepare(self, slide):
        def build():
            idx, valid = tile_neighbours(slide.geom)
            inverse, nb, C = APEG.cells(slide.array)
            to = lambda x: torch.from_numpy(x).to(self.dev)  # noqa: E731
            return to(idx), to(valid), (to(inverse), to(nb), C)
        return per_slide(self.prep, slide, build)

    def outputs(self, slide, tokens, rows, g):           # tokens [N, 3, W] of the slide's spots, g [N, W]
        idx, valid, _ = self.prepare(slide)
        v = valid[rows, :, None]                          # a tile without a spot: the token of zero features, masked
        tiles = torch.where(v, tokens[idx[rows], 1], self.net.neigh_in.bias)
        return self.net(tokens[rows, 0], tiles, valid[rows], g[rows])

    @property
    def n_steps(self):
        return sum(-(-int(s.target.sum()) // self.BATCH) for s in self.slides)

    def steps(self):
        """Batches of 128 training spots, each from one slide, so the global branch runs once per step."""
        batches = []
        for s in self.slides:
            rows = torch.nonzero(s.target).squeeze(1).cpu().numpy()
            batches += [(s, torch.from_numpy(b).to(self.dev)) for b in np.array_split(
                self.rng.permutation(rows), -(-len(rows) // self.BATCH)) if len(b)]
        self.rng.shuffle(batches)
        for s, rows in batches:
            tokens = self.net.project(s.feats)
            g = self.net.encode_global(tokens[:, 2], self.prepare(s)[2])
            fused, *branches = self.outputs(s, tokens, rows, g)
            y = s.expr[rows]
            loss = F.mse_loss(fused, y) + sum((1 - self.ALPHA) * F.mse_loss(b, y) + self.ALPHA * F.mse_loss(fused, b)
                                              for b in branches)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            yield loss.item()

    def after_epoch(self, val):
        self.sched.step(val)

    @torch.no_grad()
    def predict(self, slide, n_samples=1, seed=0):
        tokens = by_rows(slide.feats, self.net.project)
        g = self.net.encode_global(tokens[:, 2], self.prepare(slide)[2])
        rows = torch.arange(len(slide), device=self.dev)
        return torch.cat([self.outputs(slide, tokens, r, g)[0] for r in rows.split(CHUNK // 2)]), None


#################################################################################
#                             MERGE (CVPR 2025)                                 #
#################################################################################

def merge_edges(xy, z, seed, k_nn=8, k_means=5):
    """MERGE's graph: spatial 8-NN (symmetric), plus for a k-means (k = 5) of the positions and
    one of the node features: in each cluster the spot nearest its mean feature is the centroid, joined to
    every member (star) and to every other centroid (clique), both ways, in slide-wide indices -> [2, E]."""
    N = len(xy)
    nbr, valid = knn(xy, k_nn)                           # on (x, y): the published code reads one column twice
    src, dst = [np.repeat(np.arange(N), nbr.shape[1])[valid.ravel()]], [nbr.ravel()[valid.ravel()]]
    for data in (xy, z):
        k = min(k_means, N)
        with warnings.catch_warnings():                  # an empty cluster is dropped below
            warnings.simplefilter("ignore")
            _, label = kmeans2(data.astype(np.float64), k, minit="++", rng=seed)
        centroids = []
        for c in range(k):
            members = np.flatnonzero(label == c)
            if len(members):
                mean = z[members].mean(0)
                centroid = members[np.argmin(((z[members] - mean) ** 2).sum(1))]
                centroids.append(centroid)
                src.append(np.full(len(members), centroid)); dst.append(members)
        cs = np.array(centroids)                         # slide-wide indices (the published code's are per cluster)
        src.append(np.repeat(cs, len(cs))); dst.append(np.tile(cs, len(cs)))
    src, dst = np.concatenate(src), np.concatenate(dst)
    key = np.unique(np.concatenate([src * N + dst, dst * N + src]))   # symmetric, each edge once
    key = key[key // N != key % N]                       # self-loops: the GAT adds its own, after DropEdge
    return np.stack([key // N, key % N])


class GATLayer(nn.Module):
    """PyG's GATConv in plain torch (a ~40-line layer): x'_i = Σ_j α_ij·W x_j over edges j → i with
    α = softmax_j LeakyReLU_0.2(a_src·W x_j + a_dst·W x_i); heads concatenated, or averaged (concat=False)."""
    def __init__(self, d_in, d_out, heads, concat=True):
        super().__init__()
        self.heads, self.d_out, self.concat = heads, d_out, concat
        self.lin = nn.Linear(d_in, heads * d_out, bias=False)
        self.att_src, self.att_dst = nn.Parameter(torch.empty(heads, d_out)), nn.Parameter(torch.empty(heads, d_out))
        self.bias = nn.Parameter(torch.zeros(heads * d_out if concat else d_out))
        for w in (self.lin.weight, self.att_src, self.att_dst):
            nn.init.xavier_uniform_(w)                   # PyG's glorot

    def forward(self, x, edges):                         # x [N, d_in], edges [2, E] (source, destination) -> [N, ·]
        return self.propagate(self.lin(x), edges)

    def propagate(self, h, edges):                       # h = lin(x) [N, H·C]: a caller may drop x before the messages
        N, H, C = len(h), self.heads, self.d_out
        h = h.view(N, H, C)
        a_src, a_dst = (h * self.att_src).sum(-1), (h * self.att_dst).sum(-1)   # [N, H]
        # predicting: two passes over blocks of edges, so no [E, ·] tensor exists; training: one block, as autograd
        # keeps every edge's values for the backward pass anyway (a chain of blocks made a 50k-spot epoch 3x slower)
        blocks = edges.split(edges.shape[1] if torch.is_grad_enabled() else 4 * CHUNK, 1)

        def logit(src, dst):                             # [e, H]
            return F.leaky_relu(a_src[src] + a_dst[dst], 0.2)

        top = h.new_full((N, H), -1e9)
        with torch.no_grad():                            # a constant per node: the softmax and its gradient are unchanged
            for src, dst in blocks:
                top.scatter_reduce_(0, dst[:, None].expand(-1, H), logit(src, dst), "amax")
        total, out = h.new_zeros(N, H), h.new_zeros(N, H, C)
        for src, dst in blocks:                          # Σ_j w_ij and Σ_j w_ij·h_j together; α_ij = w_ij / Σ_j w_ij after
            w = (logit(src, dst) - top[dst]).exp()       # [e, H]
            total.index_add_(0, dst, w)
            out.index_add_(0, dst, w[..., None] * h[src])
        out.div_(total[..., None])                       # every node has its self-loop: no sum is zero
        return (out.reshape(N, H * C) if self.concat else out.mean(1)).add_(self.bias)   # in place: [N, H·C] is the largest


class GraphNorm(nn.Module):
    """PyG's LayerNorm in its default 'graph' mode: one mean and variance over every node and channel of the
    graph, then a per-channel affine map."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):                                # (x − mean) / (std + eps) · w + b in one pass: no [N, C] temporaries
        scale = self.weight / (x.std(correction=0) + self.eps)
        return torch.addcmul(self.bias - x.mean() * scale, x, scale)


class MergeNet(nn.Module):
    def __init__(self, d_in, genes, widths, heads=8, drop_edge=0.2):
        super().__init__()
        dims = [d_in] + [w * heads for w in widths]
        self.gats = nn.ModuleList([GATLayer(dims[i], widths[i], heads) for i in range(len(widths))])
        self.norms = nn.ModuleList([GraphNorm(d) for d in dims[1:]])
        self.out = GATLayer(dims[-1], genes, 1, concat=False)
        self.drop_edge = drop_edge

    def forward(self, z, edges):                         # z [N, 256], edges [2, E] -> [N, G]
        if self.training:                                # DropEdge: each edge kept with probability 0.8
            edges = edges[:, torch.rand(edges.shape[1], device=z.device) >= self.drop_edge]
        loops = torch.arange(len(z), device=z.device)
        edges = torch.cat([edges, torch.stack([loops, loops])], 1)   # as GATConv: a self-loop for every node
        for gat, norm in zip(self.gats, self.norms):     # one statement each: a whole slide holds two [N, H·C] at most
            z = gat.lin(z)
            z = gat.propagate(z, edges).relu_()
            z = norm(z)
        return self.out(z, edges)


class Bottleneck(nn.Module):
    """Stage 1 (MERGE: ResNet-18 + a 512 → 512 → 256 projection fine-tuned with MSE): on frozen features, an
    MLP to the 256-d node feature and a linear gene head, fitted on the training spots."""
    def __init__(self, d_in, genes):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_in, 512), nn.ReLU(), nn.Linear(512, 256))
        self.head = nn.Linear(256, genes)

    def forward(self, x):
        return self.head(self.proj(x))


class Merge(Peer):
    """MERGE: a GAT over each slide's spatial and feature-cluster graph (one slide per step, Adam 1e-3)."""
    def __init__(self, slides, G, a, dev):
        self.dev, self.seed, self.slides = dev, a.seed, slides
        self.bottleneck = self.fit_bottleneck(slides, G, a.seed, a.budget_s / 3)
        # the published per-head widths 448, 384, 256 (8 heads, ~18.7M parameters); CPU: 56, 48, 32
        widths = (448, 384, 256) if a.size == "paper" else (56, 48, 32)
        self.net = MergeNet(256, G, widths).to(dev)
        start_at_mean([self.net.out], slides)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.rng = np.random.default_rng(a.seed)
        self.graphs = {}

    def fit_bottleneck(self, slides, G, seed, seconds, epochs=300, patience=20, batch=32):
        """Adam 1e-3, batch 32, the epoch of lowest validation MSE (as baselines.py's MLP)."""
        torch.manual_seed(seed)
        net = Bottleneck(slides[0].feats.shape[1], G).to(self.dev)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        H = torch.cat([s.feats[s.target] for s in slides]); X = torch.cat([s.expr[s.target] for s in slides])
        Hv = torch.cat([s.feats[s.val] for s in slides]); Xv = torch.cat([s.expr[s.val] for s in slides])
        gen, t0 = torch.Generator().manual_seed(seed), time.time()
        best, best_state, best_epoch = float("inf"), copy.deepcopy(net.state_dict()), 0
        for ep in range(1, epochs + 1):
            net.train()
            for b in torch.randperm(len(H), generator=gen).split(batch):
                loss = F.mse_loss(net(H[b]), X[b])
                opt.zero_grad(); loss.backward(); opt.step()
            net.eval()
            with torch.no_grad():
                v = F.mse_loss(net(Hv), Xv).item()
            if v < best:
                best, best_epoch, best_state = v, ep, copy.deepcopy(net.state_dict())
            if ep - best_epoch >= patience or (seconds and time.time() - t0 > seconds):
                break
        net.load_state_dict(best_state)
        return net.eval()

    def prepare(self, slide):
        def build():
            with torch.no_grad():
                z = by_rows(slide.feats, self.bottleneck.proj)
            return z, torch.from_numpy(merge_edges(slide.geom.xy, z.cpu().numpy(), self.seed)).to(self.dev)
        return per_slide(self.graphs, slide, build)

    @property
    def n_steps(self):
        return sum(bool(s.target.any()) for s in self.slides)

    def steps(self):
        """One slide per step (MERGE)."""
        for i in self.rng.permutation(len(self.slides)):
            s = self.slides[i]
            if s.target.any():
                pred = self.net(*self.prepare(s))
                loss = F.mse_loss(pred[s.target], s.expr[s.target])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                yield loss.item()

    @torch.no_grad()
    def predict(self, slide, n_samples=1, seed=0):
        return self.net(*self.prepare(slide)), None


#################################################################################
#                                   Fitting                                     #
#################################################################################

PEERS = {"stflow": STFlow, "triplex": Triplex, "merge": Merge}
DEFAULT_BUDGET = {                                       # (epochs, patience) of each paper's code
    "stflow": (100, 20),                                 # 100 epochs, early stop after 20 evaluations
    "triplex": (200, 20),                                # Her2ST config: 200 epochs, patience 20
    "merge": (400, 40),                                  # 400 epochs without early stop; here a patience of 40
}


def fit(method, slides, G, a, dev):
    """Train a peer on a fold's slides -> (predict: Slide -> (mean [N, G], std [N, G], samples [S, N, G] or
    None) as numpy, the training record). Early stop on validation MSE for all three (STFlow and TRIPLEX
    select by validation PCC, MERGE does not select)."""
    torch.manual_seed(a.seed)
    peer = PEERS[method](slides, G, a, dev)
    epochs, patience = DEFAULT_BUDGET[method]
    record = train(peer, slides, Budget(a.epochs or epochs, a.patience or patience, a.budget_s), method)
    peer.net.eval()
    std = None if method == "stflow" else residual_std(peer, slides)

    def predict(slide):
        check_pitch(slide, slides)
        mean, samples = peer.predict(slide, a.samples if method == "stflow" else 1, a.seed)
        if samples is None:                              # a point predictor: a Gaussian per gene, as ridge
            return mean.cpu().numpy(), std.expand_as(mean).cpu().numpy(), None
        spread = samples.std(0, correction=1 if len(samples) > 1 else 0)   # as sample.py
        return mean.cpu().numpy(), spread.cpu().numpy(), samples.cpu().numpy()
    return predict, record
