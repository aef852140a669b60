"""HINGE: a pre-trained CellFM backbone turned into a histology-conditioned masked-diffusion generator of
spatial gene expression (the paper's Sec. 3; CellFM's released model and the official HINGE code). Top to
bottom: embeddings and the condition (with the spot's surroundings for --spatial), retention blocks with SoftAdaLN,
the model, variants and presets; diffusion.py trains and samples it. Backbone parameter names are the released
CellFM checkpoints'."""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from heads import make_head


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)            # x·(1 + scale) + shift in one pass


def pick(x, idx):
    """x [B, L, ...] at positions idx [B, R] -> [B, R, ...]; idx None: x."""
    return x if idx is None else x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


# gate_a, gate_f among the six SoftAdaLN outputs (shift_a, scale_a, gate_a, shift_f, scale_f, gate_f)
GATE_CHUNKS = [2, 5]


def gate(g, kind):
    """SoftAdaLN's residual gate τ(c): the official sigmoid(g), its bias starting at 6, or the residual 1 + g."""
    return torch.sigmoid(g) if kind == "sigmoid" else 1 + g


#################################################################################
#                                  Embeddings                                   #
#################################################################################

class LoRALinear(nn.Linear):
    """Linear (bias-free as CellFM's unless asked) + an optional low-rank update B·A/r (the official LoraBlock's 1/r
    scale), under the checkpoint names `<name>.weight`, `<name>.bias`; A and B are set by `initialize_weights`."""
    def __init__(self, d_in, d_out, rank=0, bias=False):
        super().__init__(d_in, d_out, bias=bias)
        self.rank = rank
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, d_in))
            self.lora_B = nn.Parameter(torch.empty(d_out, rank))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) / self.rank if self.rank else y


class SoftBinFFN(nn.Module):
    """CellFM value encoder: a scalar becomes a softmax over 256 learned bins (CellFM, Zeng et al. 2025)."""
    def __init__(self, dim, bins=256):
        super().__init__()
        self.w1 = nn.Linear(1, bins, bias=False)
        self.w3 = nn.Linear(bins, bins, bias=False)
        self.table = nn.Linear(bins, dim, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))

    def forward(self, x):                                # x [B, G]
        h = F.leaky_relu(self.w1(x.unsqueeze(-1)))       # [B, G, bins]
        h = self.w3(h) + self.a * h                      # [B, G, bins]
        return self.table(torch.softmax(h, dim=-1))      # [B, G, D]


class ValueEncoder(nn.Module):                           # CellFM's names: value_enc.value_enc.*, value_enc.mask_emb
    def __init__(self, dim):
        super().__init__()
        self.value_enc = SoftBinFFN(dim)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, dim))  # CellFM's pre-training mask; the official HINGE skips it

    def forward(self, x):
        return self.value_enc(x)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of integer diffusion steps t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def mlp(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out))


class Around(NamedTuple):
    """A spot's surroundings on its slide (train.py --spatial), as standardised features."""
    nbr: torch.Tensor                                    # [B, M, hist_dim] features of the spots within the radius
    offset: torch.Tensor                                 # [B, M, 2] where they lie, in radii
    mask: torch.Tensor                                   # [B, M] True for a neighbour, False for padding
    slide: torch.Tensor                                  # [B, hist_dim] the mean features of the spot's slide


class SpotSpace(NamedTuple):
    """Slides on the device for a spatial design: folds.SlideSpace as tensors, features standardised."""
    features: torch.Tensor                               # [N, hist_dim]
    idx: torch.Tensor                                    # [N, M] neighbour rows, nearest first; -1 past the last
    offset: torch.Tensor                                 # [N, M, 2] in radii
    weight: torch.Tensor                                 # [N, M] distance weights
    count: torch.Tensor                                  # [N] neighbours within the radius
    means: torch.Tensor                                  # [n_slides, hist_dim] each slide's mean features
    slide: torch.Tensor                                  # [N] each spot's slide

    @classmethod
    def of(cls, space, mean, std, device):               # folds.SlideSpace, the run's feature statistics
        def put(a, dtype=None):
            return torch.as_tensor(a, dtype=dtype).to(device)
        nb, f32 = space.neighbours, torch.float32
        return cls(put((space.features - mean) / std, f32), put(nb.idx), put(nb.offset, f32), put(nb.weight, f32),
                   put(nb.count), put((space.means - mean) / std, f32), put(space.slide))

    def around(self, rows):                              # rows: a slice or indices -> Around of those spots
        idx = self.idx[rows]
        return Around(self.features[idx.clamp_min(0)], self.offset[rows], idx >= 0, self.means[self.slide[rows]])


class SpatialCond(nn.Module):
    """The spot's embedded features attend over its own and its neighbours', each token told its offset (TRIPLEX's
    neighbour branch); with `slide`, the slide's mean features are added (TRIPLEX's global branch, pooled by the
    mean). Both outputs start at zero (initialize_weights): untrained, the condition is the spot's own."""
    def __init__(self, dim, heads, slide):
        super().__init__()
        self.offset_embedder = mlp(2, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.around_out = nn.Linear(dim, dim)
        self.slide_out = nn.Linear(dim, dim) if slide else None

    def forward(self, own, nbr, offset, mask, slide):    # own [B, D], nbr [B, M, D], offset [B, M, 2], mask [B, M]
        B = len(own)
        where = torch.cat([offset.new_zeros(B, 1, 2), offset], 1)                  # [B, 1+M, 2]: the spot at 0
        keys = torch.cat([own[:, None], nbr], 1) + self.offset_embedder(where)     # [B, 1+M, D]
        ignore = torch.cat([mask.new_zeros(B, 1), ~mask], 1)                   # [B, 1+M]: the spot itself is a key
        ctx = self.attn(own[:, None], keys, keys, key_padding_mask=ignore, need_weights=False)[0][:, 0]  # [B, D]
        c = own + self.around_out(ctx)
        return c if self.slide_out is None else c + self.slide_out(slide)


class CondNet(nn.Module):
    """c = MLP(t) + MLP(histology) + MLP(target visibility mask) (official HINGE CondNet). A spatial design
    (train.py --spatial) reads the spot's surroundings into the histology term and, for `joint`, gives every gene
    token what the neighbours show of that gene (`joint`, applied in the backbone's forward)."""
    def __init__(self, dim, hist_dim, n_genes, spatial="none", heads=4):
        super().__init__()
        self.t_embedder = mlp(256, dim)
        self.hist_embedder = mlp(hist_dim, dim)
        self.mask_embedder = mlp(n_genes, dim)
        self.spatial = None if spatial == "none" else SpatialCond(dim, heads, slide=spatial in ("slide", "joint"))
        self.joint = mlp(2, dim) if spatial == "joint" else None

    def embed(self, hist, around=None):                  # hist [B, hist_dim] -> [B, D]; once per spot when sampling
        own = self.hist_embedder(hist)
        if self.spatial is None:
            return own
        if around is None:
            raise ValueError("this run reads each spot's surroundings (train.py --spatial): pass them (model.Around)")
        return self.spatial(own, self.hist_embedder(around.nbr), around.offset, around.mask,
                            self.hist_embedder(around.slide))

    def neighbour_tokens(self, neighbours):              # neighbours [B, G, 2] -> [B, G, D], or 0 without
        return 0 if neighbours is None or self.joint is None else self.joint(neighbours)

    def forward(self, t, hist_emb, target_visible):      # t [B], hist_emb [B, C], target_visible [B, G]
        return self.t_embedder(timestep_embedding(t)) + hist_emb + self.mask_embedder(target_visible.float())


def zero_spatial_outputs(cond_net):
    """Every spatial path's last layer at zero (--spatial): the untrained model is the model without it."""
    spatial = cond_net.spatial
    last = [] if spatial is None else [spatial.around_out] + ([spatial.slide_out] if spatial.slide_out else [])
    for lin in last + ([cond_net.joint[-1]] if cond_net.joint is not None else []):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


#################################################################################
#                     Retention blocks (CellFM) with SoftAdaLN (HINGE)          #
#################################################################################

class Retention(nn.Module):
    """CellFM linear attention: ReLU q/k, per-head RMS norm, SiLU gate, no softmax (CellFM, Zeng et al. 2025)."""
    def __init__(self, dim, heads, rank=0):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.u_proj, self.o_proj = (LoRALinear(dim, dim, rank) for _ in range(5))

    def forward(self, x, key_mask=None, key_pos=None, only=None):
        """x [B, L, D]; the keys are every token, those of key_mask [B, L] (0/1) or those at key_pos [B, V];
        only [B, R]: the queries at these positions alone -> [B, R, D]."""
        B, L, D = x.shape
        h, dh = self.heads, D // self.heads
        xq = pick(x, only)                               # [B, R, D] (R = L without `only`)
        q = F.relu(self.q_proj(xq)).view(B, -1, h, dh)  # [B, R, h, dh]
        xk = pick(x, key_pos)                            # [B, V, D] (V = L without `key_pos`)
        k = F.relu(self.k_proj(xk))                      # [B, V, D]
        if key_mask is not None:                         # hidden genes are neither keys nor values (a zero key will do)
            k = k * key_mask[:, :, None]
        v = self.v_proj(xk)                              # [B, V, D]
        kv = torch.einsum("blhd,blhe->bhde", k.view(B, -1, h, dh), v.view(B, -1, h, dh))  # [B, h, dh, dh]
        kv = kv / (dh * math.sqrt(L - 1))                # q, k by rsqrt(dh), v by rsqrt(#genes, all): on kv, once
        o = torch.einsum("brhd,bhde->brhe", q, kv)       # [B, R, h, dh]
        o32 = o.float()                                  # SRMSNorm per head, in float32 under autocast (official HINGE)
        o = (o32 / (o32.norm(dim=-1, keepdim=True) / math.sqrt(dh)).clamp_min(1e-12)).to(o.dtype)
        o = o.reshape(B, -1, D) * F.silu(self.u_proj(xq))  # [B, R, D]
        return self.o_proj(o)


class GatedLinearUnit(nn.Module):
    """CellFM GLU: o(u(x) * v(x)), no activation."""
    def __init__(self, dim, rank=0):
        super().__init__()
        self.u_proj, self.v_proj, self.o_proj = (LoRALinear(dim, dim, rank) for _ in range(3))

    def forward(self, x):
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class SoftNorm(nn.Module):
    """z = (1 - λ)·h + λ·LN(h), λ = sigmoid(b): starts as the identity (the paper's SoftNorm)."""
    def __init__(self, dim, enabled=True):
        super().__init__()
        self.enabled = enabled
        self.lambda_bias = nn.Parameter(torch.zeros(1))

    def forward(self, h):
        n = F.layer_norm(h, h.shape[-1:], eps=1e-6)
        if not self.enabled:                             # --no-soft-norm: plain LayerNorm
            return n
        return torch.lerp(h, n, torch.sigmoid(self.lambda_bias))


class RetentionBlock(nn.Module):
    """CellFM post-LN block h <- LN(α·h + sublayer(h)); with a condition c, SoftAdaLN:
    h <- LN(α·h + gate(c)·sublayer(shift(c) + (1 + scale(c))·SoftNorm(h)))."""
    def __init__(self, cfg, layer):
        super().__init__()
        dim = cfg.dim
        self.alpha = (2 * cfg.layers) ** 0.25            # DeepNorm residual scale (CellFM)
        self.attn = Retention(dim, cfg.heads, cfg.lora_rank)
        self.ffn = GatedLinearUnit(dim, cfg.lora_rank)
        self.post_norm1 = nn.LayerNorm(dim, eps=1e-6)   # eps as the official HINGE sets it
        self.post_norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(cfg.dropout * layer / cfg.layers)  # CellFM: enc_dropout·i/N
        self.cond, self.gate = cfg.cond, cfg.gate
        if cfg.cond == "softadaln":
            self.adaln = nn.Linear(dim, 6 * dim)
            self.soft_norm1 = SoftNorm(dim, cfg.soft_norm)
            self.soft_norm2 = SoftNorm(dim, cfg.soft_norm)
        elif cfg.cond == "hist-affine-ln":                # ablation: c only modulates the post-LNs
            self.adaln = nn.Linear(dim, 4 * dim)

    def forward(self, h, c=None, key_mask=None, key_pos=None, only=None):
        """h [B, L, D], c [B, D] or None (bare CellFM); keys and queries as Retention's -> [B, R, D]."""
        def attn(z):
            return self.dropout(self.attn(z, key_mask, key_pos, only))
        if c is None:
            h = self.post_norm1(self.alpha * pick(h, only) + attn(h))
            return self.post_norm2(self.alpha * h + self.dropout(self.ffn(h)))
        if self.cond == "hist-affine-ln":
            s1, k1, s2, k2 = self.adaln(F.silu(c)).unsqueeze(1).chunk(4, dim=-1)
            h = modulate(self.post_norm1(self.alpha * pick(h, only) + attn(h)), s1, k1)
            return modulate(self.post_norm2(self.alpha * h + self.dropout(self.ffn(h))), s2, k2)
        sa, ka, ga, sf, kf, gf = self.adaln(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)  # each [B, 1, D]
        a = attn(modulate(self.soft_norm1(h), sa, ka))
        h = self.post_norm1(torch.addcmul(self.alpha * pick(h, only), gate(ga, self.gate), a))
        f = self.ffn(modulate(self.soft_norm2(h), sf, kf))
        return self.post_norm2(torch.addcmul(self.alpha * h, gate(gf, self.gate), self.dropout(f)))


class ValueDecoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, 1, bias=False)

    def forward(self, h):                                # h [B, G, D] -> [B, G]
        return self.w2(F.leaky_relu(self.w1(h))).squeeze(-1)


#################################################################################
#                                   The model                                   #
#################################################################################

@dataclass
class Config:
    dim: int = 128
    layers: int = 4
    heads: int = 4
    vocab: int = 24078             # genes in the CellFM vocabulary (token ids 1..vocab); scGPT: token embedding rows
    n_genes: int = 300             # selected genes G
    hist_dim: int = 1536           # UNI 1024 + CONCH 512
    dropout: float = 0.1
    cond: str = "softadaln"        # softadaln | hist-affine-ln
    soft_norm: bool = True
    id_init: bool = True
    lora_rank: int = 0
    gate: str = "sigmoid"          # sigmoid (the official code) | residual
    init: str = "official"         # official (xavier_uniform everywhere, the official HINGE code) | cellfm
    head: str = "point"            # point (the official value decoder) | gaussian | beta-nll | bins
    head_bins: int = 32            # bins head: a zero bin and 31 even bins of log2(count + 1)
    spatial: str = "none"          # none | neighbourhood | slide | joint: what of its slide a spot reads (--spatial)
    backbone: str = "cellfm"       # cellfm (Hinge) | scgpt (scgpt.ScGPT); the fields below are scGPT's (its args.json)
    ffn: int = 0                   # feed-forward width d_hid
    values: str = "raw"            # raw (log2(count + 1)) | binned (per-spot quantile bins) | category (bins, embedded)
    n_bins: int = 51
    pad_value: int = -2            # the value <cls> carries (scGPT's pad_value)
    cls_token: int = 0             # token embedding row of <cls>

    @property
    def gene_rows(self):           # vocab + padding row 0, rounded up to a multiple of 8 (CellFM)
        return (self.vocab + 1 + 7) // 8 * 8


class Hinge(nn.Module):
    """CellFM backbone + HINGE conditioning. `forward(..., hist_emb=None)` is the bare CellFM."""
    def __init__(self, cfg, gene_ids):
        super().__init__()
        self.cfg = cfg
        gene_ids = torch.as_tensor(gene_ids, dtype=torch.long)
        if len(gene_ids) != cfg.n_genes or gene_ids.min() < 1 or gene_ids.max() > cfg.vocab:
            raise ValueError(f"{len(gene_ids)} gene token ids in [{int(gene_ids.min())}, {int(gene_ids.max())}] do not "
                             f"fit {cfg.n_genes} genes and a vocabulary of {cfg.vocab} (ids 1..{cfg.vocab})")
        self.register_buffer("gene_ids", gene_ids, persistent=False)
        # --- CellFM backbone, names as in the released checkpoints ---
        self.gene_emb = nn.Parameter(torch.empty(cfg.gene_rows, cfg.dim))
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.zero_emb = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.value_enc = ValueEncoder(cfg.dim)
        self.encoder = nn.ModuleList(RetentionBlock(cfg, i) for i in range(cfg.layers))
        self.value_dec = ValueDecoder(cfg.dim)
        # --- HINGE conditioning ---
        self.cond_net = CondNet(cfg.dim, cfg.hist_dim, cfg.n_genes, cfg.spatial, cfg.heads)
        self.dec_norm = SoftNorm(cfg.dim, cfg.soft_norm)
        self.dec_adaln = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.head = make_head(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        cfg = self.cfg
        loras = [m for m in self.modules() if isinstance(m, LoRALinear) and m.rank]
        if cfg.init == "official":                       # the official code's xavier_uniform on every Linear and LoRA
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            for m in loras:
                nn.init.xavier_uniform_(m.lora_A)
                nn.init.xavier_uniform_(m.lora_B)
            nn.init.xavier_normal_(self.gene_emb)
            nn.init.xavier_normal_(self.cls_token)
        else:
            beta = (8 * cfg.layers) ** -0.25             # DeepNorm gain for v, u, o and the GLU (CellFM)
            for blk in self.encoder:
                for lin in (blk.attn.q_proj, blk.attn.k_proj):
                    nn.init.xavier_normal_(lin.weight, gain=1.0)
                for lin in (blk.attn.v_proj, blk.attn.u_proj, blk.attn.o_proj, *blk.ffn.children()):
                    nn.init.xavier_normal_(lin.weight, gain=beta)
            for m in self.cond_net.modules():            # the official CondNet's own N(0, 0.02), zero bias
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            for m in loras:                              # B = 0: LoRA starts as a no-op (CellFM lora.py)
                nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))
                nn.init.zeros_(m.lora_B)
            nn.init.normal_(self.gene_emb, std=0.02)
            nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.zero_emb, std=0.02)
        with torch.no_grad():
            self.gene_emb[0].zero_()                     # token 0 is padding
        zero_spatial_outputs(self.cond_net)              # --spatial: the untrained model reads only its own spot
        if not cfg.id_init:                              # --no-id-init: the heads keep their Linear init, λ = 0.5
            return
        if cfg.head != "point":                          # a zero correction: the head's mean starts as the decoder's
            nn.init.zeros_(self.head.proj.weight)
            nn.init.zeros_(self.head.proj.bias)
        heads = [blk.adaln for blk in self.encoder if hasattr(blk, "adaln")] + [self.dec_adaln]
        for lin in heads:                                # shift = scale = 0: the untrained model is CellFM
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if cfg.cond == "softadaln" and cfg.gate == "sigmoid":
            with torch.no_grad():                        # gate biases 6: sigmoid(6) ≈ 0.9975, almost CellFM (official)
                for blk in self.encoder:
                    blk.adaln.bias.view(6, cfg.dim)[GATE_CHUNKS] = 6.0
        for n in (m for m in self.modules() if isinstance(m, SoftNorm)):
            nn.init.constant_(n.lambda_bias, -12.0)     # λ = sigmoid(-12) ≈ 6e-6: SoftNorm starts as the identity

    def embed_histology(self, hist, around=None):        # hist [B, hist_dim] -> [B, D]; once per spot when sampling
        if hist.shape[-1] != self.cfg.hist_dim:
            raise ValueError(f"histology features have dimension {hist.shape[-1]} but the model expects "
                             f"{self.cfg.hist_dim}; use the same --features as in training")
        return self.cond_net.embed(hist, around)

    def forward(self, x, visible, t=None, target_visible=None, hist_emb=None, only=None, neighbours=None):
        """x [B, G] values (hidden ones filled), visible [B, G] in {0,1}, t [B] ints, target_visible [B, G]
        genes visible after this step, hist_emb [B, D], only [B, R] gene positions (default all G), neighbours
        [B, G, 2] what the spot's neighbours show of each gene (--spatial joint; neighbour_state). Returns the
        head's output for those genes: x̂0 [B, R] for the point head, the parameters of each gene's distribution
        otherwise (self.head.mean gives x̂0)."""
        B, G = x.shape
        vis = visible.to(x.dtype)
        tok = self.gene_emb[self.gene_ids][None] + self.value_enc(x) + self.zero_emb * (1 - vis)[..., None]  # [B, G, D]
        tok = tok + self.cond_net.neighbour_tokens(neighbours)                  # [B, G, D]
        h = torch.cat([self.cls_token.expand(B, -1, -1), tok], dim=1)            # [B, 1+G, D]
        key_mask, key_pos = torch.cat([vis.new_ones(B, 1), vis], dim=1), None   # [B, 1+G]: <cls> and visible genes
        n_vis = visible.sum(1)
        if n_vis.min() == n_vis.max():                   # the sampler: one t, so gather the keys, compute no other k, v
            key_mask, key_pos = None, None if n_vis[0] == G else key_mask.nonzero()[:, 1].view(B, -1)  # [B, 1+V]
        c = None if hist_emb is None else self.cond_net(t, hist_emb, target_visible)  # [B, D]
        half = len(self.encoder) // 2
        for i, blk in enumerate(self.encoder):           # first half: hidden genes are not keys (CellFM)
            keys = (key_mask, key_pos) if i < half else (None, None)
            last = only is not None and i == len(self.encoder) - 1      # only the last layer drops queries
            h = blk(h, c, *keys, only + 1 if last else None)            # <cls> is token 0
        h = h[:, 1:] if only is None else h              # [B, R, D]
        if c is not None and self.cfg.cond == "softadaln":
            shift, scale = self.dec_adaln(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
            h = modulate(self.dec_norm(h), shift, scale)
        return self.head(h, self.value_dec(h), only)     # [B, R] or [B, R, params]

    def backbone_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if is_backbone_key(k)}


def is_backbone_key(name):
    return not name.startswith(("cond_net.", "dec_", "head.")) and ".adaln." not in name and \
        ".soft_norm" not in name and "lora_" not in name


#################################################################################
#                                 Variants                                      #
#################################################################################

VARIANTS = ("hinge", "scratch", "decoder-tune", "backbone-lora")


def set_trainable(model, variant):
    """Which parameters train (paper ablations); returns the trainable parameter count."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    for name, p in model.named_parameters():
        if variant == "scratch":
            p.requires_grad = True
        elif variant == "decoder-tune":
            p.requires_grad = not is_backbone_key(name) or name.startswith(("value_dec.", "decoder."))  # CellFM, scGPT
        elif variant == "backbone-lora":
            p.requires_grad = not is_backbone_key(name) or "lora_" in name
        else:
            p.requires_grad = not is_backbone_key(name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#################################################################################
#                                    Presets                                    #
#################################################################################

def cellfm_800m(**kw): return Config(**{"dim": 1536, "layers": 40, "heads": 48, "vocab": 24078, **kw})
def cellfm_80m(**kw): return Config(**{"dim": 1536, "layers": 2, "heads": 48, "vocab": 27855, **kw})
def small(**kw): return Config(**{"dim": 128, "layers": 4, "heads": 4, **kw})
def tiny(**kw): return Config(**{"dim": 32, "layers": 2, "heads": 2, "vocab": 63, **kw})


# scGPT (scgpt.py): whole-human's shape (args.json; <pad>, <cls>, <eoc> the last of 60,697 rows); small, tiny: raw
# values
def scgpt_human(**kw): return Config(**{"backbone": "scgpt", "dim": 512, "layers": 12, "heads": 8, "ffn": 512,
                                        "vocab": 60697, "cls_token": 60695, "values": "binned", "n_bins": 51,
                                        "dropout": 0.2, **kw})
def scgpt_small(**kw): return scgpt_human(**{"dim": 128, "layers": 4, "heads": 4, "ffn": 128, "values": "raw",
                                             "dropout": 0.1, **kw})
def scgpt_tiny(**kw): return scgpt_human(**{"dim": 32, "layers": 2, "heads": 2, "ffn": 32, "values": "raw",
                                            "dropout": 0.1, **kw})


PRESETS = {"cellfm-800m": cellfm_800m, "cellfm-80m": cellfm_80m, "small": small, "tiny": tiny,
           "scgpt": scgpt_human, "scgpt-small": scgpt_small, "scgpt-tiny": scgpt_tiny}


def make_config(preset, **kw):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset](**kw)
