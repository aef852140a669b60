"""STFlow (ICML 2025) on frozen spot features: flow matching of a whole slide's expression from a ZINB
prior, by a frame-averaged spatial transformer over each spot's 8 nearest spots."""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial import cKDTree

from common import UserError
from model import timestep_embedding

from .harness import CHUNK, Peer, by_rows, knn, per_slide, positions, start_at_mean, training_pitch_um


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
    del rate                                             # in place from here: a slide's [N, G] is the largest tensor
    return counts.mul_(torch.rand(shape, device=dev, generator=gen) >= 0.5).add_(1).log2_()


class STFlow(Peer):
    """Flow matching over whole slides (STFlow): x_t = (1 − t)·x0 + t·x1 with the ZINB prior x0; the network
    predicts x1 (MSE); sampling = Euler on t = linspace(0.01, 1, 5), the fourth prediction is the output."""
    EPOCHS, PATIENCE = 100, 20                           # STFlow's code: 100 epochs, early stop after 20 evaluations
    GENERATIVE = True                                    # samples from different priors; their spread is the std
    K, CHUNKS_PER_SLIDE, BATCH = 8, 10, 2
    MAX_CHUNK = 5000                                     # ours: a Visium slide (4,992 spots) trains as published,
                                                         # a larger one in chunks this size (uncapped, a 50k-spot
                                                         # step outgrew 16 GiB)

    def __init__(self, slides, G, a, dev):
        self.dev, self.G, self.pitch_um = dev, G, training_pitch_um(slides)
        # 128 wide, 4 layers, 4 heads: the paper's, CPU or not
        self.net = STFlowNet(slides[0].feats.shape[1], G).to(dev)
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
        """A random centre and its ⌊N·u⌋ nearest training spots (at least 2, at most MAX_CHUNK), u ~ U(0, 1)
        (STFlow)."""
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
