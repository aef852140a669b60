"""TRIPLEX (CVPR 2024) on frozen spot features: target, neighbour (5 x 5 tiles) and global (whole-slide)
branches fused by cross-attention. TRIPLEX's ResNet-18 on pixels gives way to the spot's frozen features."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial import cKDTree

from .harness import CHUNK, Peer, by_rows, per_slide, start_at_mean


#################################################################################
#                           TRIPLEX (CVPR 2024)                                 #
#################################################################################

class FeedForward(nn.Sequential):
    def __init__(self, dim, hidden, dropout):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


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
        super().__init__()                               # depth, heads, mlp_ratio, dropout: (fusion, global, neighbour)
        fusion, glob, neigh = 0, 1, 2
        # each branch projects the frozen features to its width (TRIPLEX's inputs are the width already)
        self.target_in, self.neigh_in, self.global_in = (nn.Linear(feat_dim, dim) for _ in range(3))
        self.global1 = Block(dim, heads[glob], mlp_ratio[glob], dropout[glob])
        self.apeg = APEG(dim)
        self.global2 = nn.ModuleList([Block(dim, heads[glob], mlp_ratio[glob], dropout[glob])
                                      for _ in range(depth[glob] - 1)])
        self.global_norm = nn.LayerNorm(dim)
        self.neigh = nn.ModuleList([Block(dim, heads[neigh], mlp_ratio[neigh], dropout[neigh])
                                    for _ in range(depth[neigh])])
        self.neigh_norm = nn.LayerNorm(dim)
        offsets = np.array([(abs(r1 - r2), abs(c1 - c2)) for r1 in range(5) for c1 in range(5) for r2 in range(5)
                            for c2 in range(5)])
        self.register_buffer("bias_idx", torch.from_numpy(offsets[:, 0] * 5 + offsets[:, 1]).view(25, 25),
                             persistent=False)
        self.neigh_bias = nn.ParameterList([nn.Parameter(torch.zeros(heads[neigh], 25)) for _ in range(depth[neigh])])
        self.fusion = nn.ModuleList([Block(dim, heads[fusion], mlp_ratio[fusion], dropout[fusion])
                                     for _ in range(depth[fusion])])
        self.fusion_norm = nn.LayerNorm(dim)
        self.fc, self.fc_target, self.fc_neigh, self.fc_global = (nn.Linear(dim, genes) for _ in range(4))

    def project(self, feats):                            # feats [N, D] -> [N, 3, W]: each branch's token of every spot
        return torch.stack([self.target_in(feats), self.neigh_in(feats), self.global_in(feats)], 1)

    def encode_global(self, x, cells):                   # global tokens x [N, W] -> [N, W]: each spot attends to all
        x = self.global1(x[None])[0]
        x = self.apeg(x, cells)[None]
        for blk in self.global2:
            x = blk(x)
        return self.global_norm(x[0])

    def forward(self, t, n, valid, g):                   # t [B, W], n [B, 25, W], valid [B, 25], g [B, W] -> 4 x [B, G]
        mask = torch.zeros(valid.shape, device=t.device).masked_fill(~valid, -1e4)[:, None, None]  # [B, 1, 1, 25]
        for blk, table in zip(self.neigh, self.neigh_bias):
            n = blk(n, bias=table[:, self.bias_idx][None] + mask)   # learned bias per head and (|Δrow|, |Δcol|)
        n = self.neigh_norm(n)
        t = t[:, None]                                   # [B, 1, W]: one token from the spot's features
                                                         # (TRIPLEX: a ResNet-18's 7 x 7 on pixels)
        f1, f2 = g[:, None], g[:, None]                  # the global token queries both, one weight-shared encoder
        for blk in self.fusion:
            f1, f2 = blk(f1, t), blk(f2, n, mask)
        fused = self.fusion_norm((f1 + f2)[:, 0])
        return [torch.clamp(head(x), 0) for head, x in ((self.fc, fused), (self.fc_target, t.mean(1)),
                                                        (self.fc_neigh, n.mean(1)), (self.fc_global, g))]


SIZES = {  # (fusion, global, neighbour) each
    # the CVPR release's Her2ST config (config/her2st/TRIPLEX.yaml at ac50e05, config/ST/andersson at HEAD); an MLP is
    # width x ratio wide, as in HEAD's code (ac50e05's passed the neighbour ratio itself, 1, as the MLP's width)
    "paper": dict(dim=512, depth=(1, 3, 3), heads=(4, 16, 16), mlp_ratio=(4, 4, 1), dropout=(0.2, 0.1, 0.3)),
    # CPU: width 128, heads so that each stays 32 wide
    "cpu": dict(dim=128, depth=(2, 2, 4), heads=(4, 4, 4), mlp_ratio=(2, 2, 2), dropout=(0.15, 0.1, 0.1)),
}


class Triplex(Peer):
    """TRIPLEX: target, neighbour and global branches fused by cross-attention; loss MSE(fused) +
    Σ_branch [0.7·MSE(branch) + 0.3·MSE(fused, branch)]; only the fused output predicts."""
    EPOCHS, PATIENCE = 200, 20                           # TRIPLEX's Her2ST config: 200 epochs, patience 20
    BATCH, ALPHA = 128, 0.3

    def __init__(self, slides, G, a, dev):
        self.dev = dev
        self.net = TriplexNet(slides[0].feats.shape[1], G, **SIZES[a.size]).to(dev)
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
