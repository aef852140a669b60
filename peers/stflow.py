"""STFlow (ICML 2025) on frozen spot features: flow matching of a whole slide's expression from a ZINB
prior, by a frame-averaged spatial transformer over each spot's 8 nearest spots whose blocks refine the
expression one after another (the released code, Codex-STFlow model/transformer.py, denoiser.py, fa.py)."""
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
    """E(2)-invariant edge inputs by frame averaging (STFlow's create_frame): each spot's offsets to its neighbours,
    centred on their mean, in the PCA frame of those centred offsets under the 4 sign choices of its two axes, with
    the length of the (uncentred) offset -> [4, N, k, 3]."""
    rel = (xy[nbr] - xy[:, None]) * valid[..., None]     # [N, k, 2]
    count = valid.sum(1).clamp(min=1)[:, None, None]
    centred = (rel - rel.sum(1, keepdim=True) / count) * valid[..., None]
    cov = torch.einsum("nki,nkj->nij", centred, centred) / count
    axes = torch.linalg.eigh(cov + 1e-6 * torch.eye(2, device=xy.device))[1]  # [N, 2, 2], columns = principal axes
    signs = torch.tensor([[1., 1.], [1., -1.], [-1., 1.], [-1., -1.]], device=xy.device)
    framed = torch.einsum("nki,nij->nkj", centred, axes)[None] * signs[:, None, None]  # [4, N, k, 2]
    return torch.cat([framed, rel.norm(dim=-1)[None, ..., None].expand(4, -1, -1, 1)], -1)


def spatial_graph(xy, k, dev):
    nbr, valid = knn(xy, k)
    nbr, valid = torch.from_numpy(nbr).to(dev), torch.from_numpy(valid).to(dev)
    return Graph(nbr, valid, frame_offsets(torch.from_numpy(xy).float().to(dev), nbr, valid))


class SwiGLU(nn.Module):
    """timm's SwiGLUPacked with a LayerNorm, STFlow's every MLP: Linear(d_in → hidden), SiLU(a)·b of its two
    halves, dropout, LayerNorm(hidden / 2), Linear(→ d_out), dropout."""
    def __init__(self, d_in, hidden, d_out, dropout):
        super().__init__()
        self.fc1, self.norm = nn.Linear(d_in, hidden), nn.LayerNorm(hidden // 2)
        self.fc2, self.drop = nn.Linear(hidden // 2, d_out), nn.Dropout(dropout)

    def forward(self, x):
        return self.rest(self.fc1(x))

    def rest(self, y):                                   # what follows fc1: y = fc1(x) [..., hidden] -> [..., d_out]
        a, b = y.chunk(2, -1)
        return self.drop(self.fc2(self.norm(self.drop(F.silu(a) * b))))


class STFlowLayer(nn.Module):
    """STFlow's block over each spot's k nearest spots. Per head, logit_ij = SwiGLU([q_i, k_j, e_ij, g_j − g_i])
    (one SwiGLU shared by the heads, e the head's share of the frame-averaged edge features, g the block's input
    expression); the message SwiGLU([Σ_j α_ij v_j, Σ_j α_ij e_ij]) is added to the token, then a SwiGLU
    feed-forward (no pre-norm), and a gene head gives the block's x̂1, the expression the next block reads."""
    def __init__(self, dim, heads, genes, dropout, edge_dim=128):
        super().__init__()
        self.heads, self.split = heads, 2 * dim // heads + edge_dim // heads
        self.qkv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * dim))
        self.edge = SwiGLU(3, edge_dim, edge_dim, dropout)
        self.logit = SwiGLU(self.split + genes, dim, 1, dropout)   # the released code hard-codes 50 genes here
        self.attn_drop = nn.Dropout(dropout)
        self.out = SwiGLU(dim + edge_dim, dim, dim, dropout)
        self.ffn = SwiGLU(dim, 4 * dim, dim, dropout)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Dropout(dropout),
                                  nn.Linear(dim, genes), nn.Dropout(dropout), nn.ReLU())

    def forward(self, h, g, graph):                      # h [N, W], g [N, G] -> (h [N, W], this block's x̂1 [N, G])
        (N, W), H = h.shape, self.heads
        q, k, v = (t.view(N, H, -1) for t in self.qkv(h).chunk(3, -1))
        hs, gs = h.new_empty(N, W), g.new_empty(g.shape)
        w = self.logit.fc1.weight                        # its input [q, k, e | g_j − g_i]: the genes' part is applied
                                                         # once for every head, not copied per head
        for s in range(0, N, CHUNK):                     # blocks of centre spots: edge and FFN tensors stay [CHUNK, ·]
            nbr, valid = graph.nbr[s:s + CHUNK], graph.valid[s:s + CHUNK]
            n, kk = nbr.shape
            e = self.edge(graph.frames[:, s:s + CHUNK]).mean(0).view(n, kk, H, -1)   # averaged over the 4 frames
            z = torch.cat([q[s:s + CHUNK, None].expand(-1, kk, -1, -1), k[nbr], e], -1)      # [n, k, H, ·]
            pre = F.linear(z, w[:, :self.split], self.logit.fc1.bias) + \
                F.linear(g[nbr] - g[s:s + CHUNK, None], w[:, self.split:])[:, :, None]
            att = self.logit.rest(pre).squeeze(-1).masked_fill(~valid[..., None], -1e9)
            att = self.attn_drop(torch.softmax(att, 1) * valid[..., None])   # [n, k, H], softmax over neighbours
            msg = torch.cat([torch.einsum("nkh,nkhd->nhd", att, v[nbr]).reshape(n, -1),
                             torch.einsum("nkh,nkhd->nhd", att, e).reshape(n, -1)], -1)
            hc = h[s:s + CHUNK] + self.out(msg)
            hc = hc + self.ffn(hc)
            hs[s:s + CHUNK], gs[s:s + CHUNK] = hc, self.head(hc)
        return hs, gs


class STFlowNet(nn.Module):
    def __init__(self, feat_dim, genes, dim=128, layers=4, heads=4, dropout=0.2):
        super().__init__()
        self.embed = nn.Linear(feat_dim, dim)
        self.time = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList([STFlowLayer(dim, heads, genes, dropout) for _ in range(layers)])

    def forward(self, emb, g, t, graph):                # emb [N, W] = embed(features), g [N, G], t scalar -> x̂1 [N, G]
        # raw t ∈ [0, 1] into the 256-d sinusoid, as STFlow's code (its TimestepEmbedder gets t itself)
        h = emb + self.time(timestep_embedding(torch.tensor([float(t)], device=emb.device)))
        total = torch.zeros_like(g)                      # summed in place: a whole slide's [N, G] is the largest tensor
        for layer in self.layers:                        # only the first block reads x_t; each next one reads the x̂1
            h, g = layer(h, g, graph)                    # of the block before it
            total += g
        return total.div_(len(self.layers))              # the mean of the blocks' x̂1


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
        # 128 wide (edge features too), 4 blocks, 4 heads, dropout 0.2: the released defaults, CPU or not
        self.net = STFlowNet(slides[0].feats.shape[1], G).to(dev)
        start_at_mean([layer.head[4] for layer in self.net.layers], slides)
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
