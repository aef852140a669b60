"""HINGE on an scGPT backbone: the paper's fast variant (supplementary Table S5, HINGE (scGPT) 548 spots/s
against 26.5 for HINGE (CellFM) at K = 5).

scGPT (Cui et al. 2024) is a post-norm transformer over gene + value tokens. This module builds it with
scGPT's own parameter names (torch's for the layers), wraps its attention and feed-forward sublayers in
SoftAdaLN exactly as model.py does for CellFM; checkpoints.py reads and writes its official folder
(best_model.pt, args.json, vocab.json) by key name. Same interface as model.Hinge, so train.py, sample.py
and pretrain.py use either through checkpoints.build_model; masked diffusion, the sampler and the variants
are model.py's.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from heads import make_head


#################################################################################
#                            Embeddings and decoder                             #
#################################################################################

def bin_values(x, visible, n_bins):
    """scGPT's per-cell binning over a spot's visible genes: zeros (and hidden genes) -> 0, non-zero values ->
    1..n_bins-1 by the spot's own quantiles (np.quantile at n_bins - 1 evenly spaced levels, then np.digitize;
    scGPT's later tie randomisation is left out). x [B, G] values, visible [B, G] bool -> [B, G] float bins."""
    x = x.detach().float()
    ok = visible & (x > 0)                                            # [B, G]
    n = ok.sum(1, keepdim=True)                                       # [B, 1]
    srt = torch.where(ok, x, torch.inf).sort(1).values                # [B, G], a spot's binned values first
    pos = torch.linspace(0, 1, n_bins - 1, device=x.device) * (n - 1).clamp_min(0)  # [B, n_bins-1] quantile positions
    lo, hi = pos.floor().long(), pos.ceil().long()
    a, b = srt.gather(1, lo), srt.gather(1, hi)
    edges = a + (pos - lo) * (b - a)                                  # [B, n_bins-1] linear-interpolated quantiles
    digits = (x[..., None] >= edges[:, None, :]).sum(-1)              # [B, G] np.digitize: edges <= x
    return torch.where(ok, digits, 0).float()


class EmbeddingNorm(nn.Module):
    """Embedding then LayerNorm: scGPT's GeneEncoder (`encoder`) and CategoryValueEncoder (`value_encoder`)."""
    def __init__(self, rows, dim):
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)
        self.enc_norm = nn.LayerNorm(dim)

    def forward(self, ids):                              # ids [...] -> [..., D]
        return self.enc_norm(self.embedding(ids.long()))


class ContinuousValueEncoder(nn.Module):
    """scGPT: a value, clamped at 512 -> Linear(1, D) -> ReLU -> Linear(D, D) -> LayerNorm -> dropout."""
    def __init__(self, dim, dropout):
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v):                                # v [...] -> [..., D]
        h = F.relu(self.linear1(v.clamp(max=512).unsqueeze(-1)))
        return self.dropout(self.norm(self.linear2(h)))


class ExprDecoder(nn.Module):
    """scGPT's expression decoder `decoder.fc`: Linear, LeakyReLU, Linear, LeakyReLU, Linear(D, 1)."""
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, dim), nn.LeakyReLU(),
                                nn.Linear(dim, 1))

    def forward(self, h):                                # h [B, G, D] -> [B, G]
        return self.fc(h).squeeze(-1)


#################################################################################
#                     Transformer layers (scGPT) with SoftAdaLN (HINGE)         #
#################################################################################

class SelfAttention(nn.Module):
    """torch's MultiheadAttention parameters (in_proj_weight rows q, k, v; out_proj), computed with
    scaled_dot_product_attention so that SoftAdaLN can wrap the sublayer."""
    def __init__(self, dim, heads, rank=0, dropout=0.0):
        super().__init__()
        self.heads, self.rank, self.p = heads, rank, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = M.LoRALinear(dim, dim, rank, bias=True)
        if rank:
            self.in_proj_lora_A = nn.Parameter(torch.empty(rank, dim))
            self.in_proj_lora_B = nn.Parameter(torch.empty(3 * dim, rank))

    def forward(self, x, allowed=None, predicted=None, only=None):
        """x [B, L, D], allowed [B, 1, L, L], predicted [B, L, 1]; only [B, R]: these queries alone -> [B, R, D]."""
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)                       # [B, L, 3D]
        if self.rank:
            qkv = qkv + F.linear(F.linear(x, self.in_proj_lora_A), self.in_proj_lora_B) / self.rank
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).unbind(2)             # each [B, L, h, dh]
        if only is not None:
            q = M.pick(q, only)                                                        # [B, R, h, dh]
            if allowed is not None:                      # (set with `predicted`: some gene is hidden)
                allowed = M.pick(allowed.squeeze(1), only).unsqueeze(1)             # [B, 1, R, L]
                predicted = M.pick(predicted, only)                                    # [B, R, 1]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
                                           dropout_p=self.p if self.training else 0.0)  # [B, h, R, dh]
        o = o.transpose(1, 2).reshape(B, -1, D)                                        # [B, R, D]
        if predicted is None:
            return self.out_proj(o)
        # scGPT's generative pre-training (FlashscGPTMHA) returns the predicted genes' attention without out_proj
        return torch.where(predicted, o, self.out_proj(o))


class ScGPTLayer(nn.Module):
    """torch's post-norm TransformerEncoderLayer (ReLU), h <- LN(h + sublayer(h)); with a condition c, SoftAdaLN:
    h <- LN(h + gate(c)·sublayer(shift(c) + (1 + scale(c))·SoftNorm(h))), as model.RetentionBlock (no DeepNorm α)."""
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.dim
        self.self_attn = SelfAttention(dim, cfg.heads, cfg.lora_rank, cfg.dropout)
        self.linear1 = M.LoRALinear(dim, cfg.ffn, cfg.lora_rank, bias=True)
        self.linear2 = M.LoRALinear(cfg.ffn, dim, cfg.lora_rank, bias=True)
        self.norm1 = nn.LayerNorm(dim)                   # eps 1e-5, torch's and scGPT's
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)           # torch's dropout, dropout1, dropout2: one rate
        self.cond, self.gate = cfg.cond, cfg.gate
        if cfg.cond == "softadaln":
            self.adaln = nn.Linear(dim, 6 * dim)
            self.soft_norm1 = M.SoftNorm(dim, cfg.soft_norm)
            self.soft_norm2 = M.SoftNorm(dim, cfg.soft_norm)
        elif cfg.cond == "hist-affine-ln":                # ablation: c only modulates the post-LNs
            self.adaln = nn.Linear(dim, 4 * dim)

    def ffn(self, h):
        return self.linear2(self.dropout(F.relu(self.linear1(h))))

    def forward(self, h, allowed=None, predicted=None, c=None, only=None):  # h [B, L, D], c [B, D] or None (bare
        def attn(z):                                                            # scGPT), only [B, R] -> [B, R, D]
            return self.dropout(self.self_attn(z, allowed, predicted, only))
        if c is None:
            h = self.norm1(M.pick(h, only) + attn(h))
            return self.norm2(h + self.dropout(self.ffn(h)))
        if self.cond == "hist-affine-ln":
            s1, k1, s2, k2 = self.adaln(F.silu(c)).unsqueeze(1).chunk(4, dim=-1)
            h = M.modulate(self.norm1(M.pick(h, only) + attn(h)), s1, k1)
            return M.modulate(self.norm2(h + self.dropout(self.ffn(h))), s2, k2)
        sa, ka, ga, sf, kf, gf = self.adaln(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)  # each [B, 1, D]
        h = self.norm1(M.pick(h, only) + M.gate(ga, self.gate) * attn(M.modulate(self.soft_norm1(h), sa, ka)))
        f = self.ffn(M.modulate(self.soft_norm2(h), sf, kf))
        return self.norm2(h + M.gate(gf, self.gate) * self.dropout(f))


#################################################################################
#                                   The model                                   #
#################################################################################

class ScGPT(nn.Module):
    """scGPT backbone + HINGE conditioning. `forward(..., hist_emb=None)` is the bare scGPT."""
    def __init__(self, cfg, gene_ids):
        super().__init__()
        self.cfg = cfg
        ids = np.asarray(gene_ids, dtype=np.int64)
        if len(ids) != cfg.n_genes or ids.min() < 0 or ids.max() >= cfg.vocab or cfg.cls_token in ids \
                or not 0 <= cfg.cls_token < cfg.vocab:
            raise ValueError(f"{len(ids)} gene token ids in [{ids.min()}, {ids.max()}] do not fit {cfg.n_genes} genes "
                             "and "
                             f"an scGPT vocabulary of {cfg.vocab} rows (ids from 0) with <cls> at {cfg.cls_token}")
        if cfg.values == "category" and not 0 <= cfg.pad_value < cfg.n_bins + 2:
            raise ValueError(f"pad_value {cfg.pad_value} is no row of the {cfg.n_bins + 2} value embeddings "
                             "(category input)")
        self.register_buffer("gene_ids", torch.as_tensor(ids), persistent=False)
        # --- scGPT, names as in its best_model.pt (the layers' as torch's TransformerEncoderLayer) ---
        self.encoder = EmbeddingNorm(cfg.vocab, cfg.dim)
        self.value_encoder = (EmbeddingNorm(cfg.n_bins + 2, cfg.dim) if cfg.values == "category"  # + pad, mask rows
                              else ContinuousValueEncoder(cfg.dim, cfg.dropout))
        self.flag_encoder = nn.Embedding(2, cfg.dim)
        self.transformer_encoder = nn.ModuleDict({"layers": nn.ModuleList(ScGPTLayer(cfg) for _ in range(cfg.layers))})
        self.decoder = ExprDecoder(cfg.dim)
        # --- HINGE conditioning ---
        self.cond_net = M.CondNet(cfg.dim, cfg.hist_dim, cfg.n_genes, cfg.spatial, cfg.heads)
        self.dec_norm = M.SoftNorm(cfg.dim, cfg.soft_norm)
        self.dec_adaln = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.head = make_head(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """The backbone as scGPT initialises it (torch's defaults, MultiheadAttention's in_proj, gene embedding
        U(±0.1)); conditioning and LoRA as model.Hinge (cfg.init) and the same identity start (cfg.id_init)."""
        cfg, layers = self.cfg, self.transformer_encoder["layers"]
        for blk in layers:
            nn.init.xavier_uniform_(blk.self_attn.in_proj_weight)
            nn.init.zeros_(blk.self_attn.in_proj_bias)
            nn.init.zeros_(blk.self_attn.out_proj.bias)
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)
        heads = [blk.adaln for blk in layers if hasattr(blk, "adaln")] + [self.dec_adaln]
        loras = [(m.lora_A, m.lora_B) for m in self.modules() if isinstance(m, M.LoRALinear) and m.rank]
        loras += [(blk.self_attn.in_proj_lora_A, blk.self_attn.in_proj_lora_B) for blk in layers if blk.self_attn.rank]
        for m in (m for m in [*self.cond_net.modules(), *heads] if isinstance(m, nn.Linear)):
            if cfg.init == "official":                   # the official code's xavier_uniform (conditioning only here)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif m not in heads:                         # the official CondNet's own N(0, 0.02), zero bias
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for a, b in loras:
            if cfg.init == "official":
                nn.init.xavier_uniform_(a)
                nn.init.xavier_uniform_(b)
            else:                                        # B = 0: LoRA starts as a no-op
                nn.init.kaiming_uniform_(a, a=5 ** 0.5)
                nn.init.zeros_(b)
        M.zero_spatial_outputs(self.cond_net)             # --spatial: the untrained model reads only its own spot
        if not cfg.id_init:
            return
        for lin in heads:                                # shift = scale = 0: the untrained model is scGPT
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if cfg.cond == "softadaln" and cfg.gate == "sigmoid":
            with torch.no_grad():
                for blk in layers:
                    blk.adaln.bias.view(6, cfg.dim)[M.GATE_CHUNKS] = 6.0
        for n in (m for m in self.modules() if isinstance(m, M.SoftNorm)):
            nn.init.constant_(n.lambda_bias, -12.0)
        if cfg.head != "point":                          # a zero correction: the head's mean starts as the decoder's
            nn.init.zeros_(self.head.proj.weight)
            nn.init.zeros_(self.head.proj.bias)

    def embed_histology(self, hist, around=None):        # hist [B, hist_dim] -> [B, D]; once per spot when sampling
        if hist.shape[-1] != self.cfg.hist_dim:
            raise ValueError(f"histology features have dimension {hist.shape[-1]} but the model expects "
                             f"{self.cfg.hist_dim}; use the same --features as in training")
        return self.cond_net.embed(hist, around)

    def tokens(self, x, vis):                            # x [B, G], vis [B, G] bool -> [B, 1+G, D]
        cfg = self.cfg
        enc = self.value_encoder(x if cfg.values == "raw" else bin_values(x, vis, cfg.n_bins))
        genes = self.encoder(self.gene_ids)              # [G, D]
        # hidden genes enter as scGPT's generative pre-training feeds the genes it predicts (gene + flag_encoder
        # row 1, no value): the representation its weights learnt to decode, where the MLM mask value -1 is never
        # seen when generative training is on (the whole-human model's); their filled values are never read
        tok = genes + torch.where(vis[..., None], enc, self.flag_encoder.weight[1])  # [B, G, D]
        cls_id, cls_value = self.gene_ids.new_full((1,), cfg.cls_token), x.new_full((1,), cfg.pad_value)
        cls = self.encoder(cls_id) + self.value_encoder(cls_value)                  # [1, D]
        return torch.cat([cls.expand(len(x), 1, -1).to(tok.dtype), tok], dim=1)

    def hidden(self, x, visible, t=None, target_visible=None, hist_emb=None, only=None, neighbours=None):
        """x [B, G] values (hidden ones filled), visible [B, G] in {0,1}, t [B] ints, target_visible [B, G]
        genes visible after this step, hist_emb [B, D], only [B, R], neighbours [B, G, 2] -> the decoder's input
        h [B, R, D]."""
        B, G = x.shape
        vis = visible.bool()
        h = self.tokens(x, vis)                     # [B, 1+G, D]
        if neighbours is not None:                       # --spatial joint: what the neighbours show, on gene tokens
            h = torch.cat([h[:, :1], h[:, 1:] + self.cond_net.neighbour_tokens(neighbours)], 1)
        allowed = predicted = None
        # keys as in scGPT's generative pre-training, which its weights learnt: <cls> and the visible genes for all,
        # and each hidden gene for itself, so known genes never see hidden ones and hidden ones never see each other
        if not vis.all():
            keys = torch.cat([vis.new_ones(B, 1), vis], 1)                        # [B, 1+G]
            allowed = keys[:, None, None, :] | torch.eye(G + 1, dtype=torch.bool, device=x.device)  # [B, 1, 1+G, 1+G]
            predicted = ~keys[..., None]                 # [B, 1+G, 1]
        c = None if hist_emb is None else self.cond_net(t, hist_emb, target_visible)  # [B, D]
        layers = self.transformer_encoder["layers"]
        for i, blk in enumerate(layers):
            last = only is not None and i == len(layers) - 1            # <cls> is token 0
            h = blk(h, allowed, predicted, c, only + 1 if last else None)
        h = h[:, 1:] if only is None else h              # [B, R, D]
        if c is not None and self.cfg.cond == "softadaln":
            shift, scale = self.dec_adaln(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
            h = M.modulate(self.dec_norm(h), shift, scale)
        return h

    def forward(self, x, visible, t=None, target_visible=None, hist_emb=None, only=None, neighbours=None):  # Hinge's
        h = self.hidden(x, visible, t, target_visible, hist_emb, only, neighbours)  # [B, R, D]
        return self.head(h, self.decoder(h), only)                                 # [B, R] or [B, R, params]

    def backbone_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if M.is_backbone_key(k)}
