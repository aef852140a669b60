"""MERGE (CVPR 2025) on frozen spot features: a GAT over each slide's spatial and cluster graph of bottleneck
features. MERGE's fine-tuned ResNet-18 gives way to an MLP bottleneck on the spot's frozen features."""
import copy
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2

from .harness import CHUNK, Peer, by_rows, knn, per_slide, start_at_mean


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
        with torch.no_grad():                            # a constant per node: softmax and gradient unchanged
            for src, dst in blocks:
                top.scatter_reduce_(0, dst[:, None].expand(-1, H), logit(src, dst), "amax")
        total, out = h.new_zeros(N, H), h.new_zeros(N, H, C)
        for src, dst in blocks:                          # Σ_j w_ij and Σ_j w_ij·h_j at once; α_ij = w_ij / Σ_j w_ij
            w = (logit(src, dst) - top[dst]).exp()       # [e, H]
            total.index_add_(0, dst, w)
            out.index_add_(0, dst, w[..., None] * h[src])
        out.div_(total[..., None])                       # every node has its self-loop: no sum is zero
        out = out.reshape(N, H * C) if self.concat else out.mean(1)
        return out.add_(self.bias)                       # in place: [N, H·C] is the largest


class GraphNorm(nn.Module):
    """PyG's LayerNorm in its default 'graph' mode: one mean and variance over every node and channel of the
    graph, then a per-channel affine map."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):                                # (x − mean) / (std + eps) · w + b: no [N, C] temporaries
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
    MLP to the 256-d node feature and MERGE's gene head (ReLU, dropout 0.2, linear), fitted on the training spots.
    The node feature is the projection's output, before the head's ReLU (as MERGE's generate_features)."""
    def __init__(self, d_in, genes):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_in, 512), nn.ReLU(), nn.Linear(512, 256))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, genes))

    def forward(self, x):
        return self.head(self.proj(x))


def warmup_linear(step, warmup=10, total=400):
    """MERGE's lr factor: transformers 2.1's WarmupLinearSchedule (warm-up 10, total 400) after `step` steps."""
    return step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))


class Merge(Peer):
    """MERGE: a GAT over each slide's spatial and feature-cluster graph (one slide per step), Adam 1e-3 under
    MERGE's warm-up schedule. Its code steps that schedule after epochs 0, 40, 80, ... (counting from 0), so the
    first epoch trains at lr 0 (only Adam's moments move), epochs 1-40 at 1e-4, 41-80 at 2e-4, ..., 361-400
    at 1e-3: the lr climbs for the whole run and never decays."""
    EPOCHS, PATIENCE = 401, 40                           # MERGE's code: range(400 + 1) epochs without early stop;
                                                         # here patience 40
    STEP_EVERY = 40                                      # epochs between the schedule's steps

    def __init__(self, slides, G, a, dev):
        self.dev, self.seed, self.slides = dev, a.seed, slides
        self.bottleneck = self.fit_bottleneck(slides, G, a.seed, a.budget_s / 3)
        # the published per-head widths 448, 384, 256 (8 heads, ~18.7M parameters); CPU: 56, 48, 32
        widths = (448, 384, 256) if a.size == "paper" else (56, 48, 32)
        self.net = MergeNet(256, G, widths).to(dev)
        start_at_mean([self.net.out], slides)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_linear)   # lr 0 until its first step
        self.epochs_done = 0
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

    def after_epoch(self, val):
        if self.epochs_done % self.STEP_EVERY == 0:      # MERGE: `if i % 40 == 0: scheduler.step()` after epoch i
            self.sched.step()
        self.epochs_done += 1

    @torch.no_grad()
    def predict(self, slide, n_samples=1, seed=0):
        return self.net(*self.prepare(slide)), None
