"""HINGE: a pre-trained CellFM backbone turned into a histology-conditioned masked-diffusion
generator of spatial gene expression (the paper's Sec. 3; CellFM's released model and the official HINGE code).

One file, top to bottom: checkpoint loading, embeddings, retention blocks with SoftAdaLN,
the model, masked and Gaussian diffusion, the sampler, variants and presets.
Parameter names of the backbone are exactly those of the released CellFM checkpoints.
"""
import math
import os
import re
from dataclasses import dataclass, asdict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


GATE_CHUNKS = [2, 5]  # gate_a, gate_f among the six SoftAdaLN outputs (shift_a, scale_a, gate_a, shift_f, scale_f, gate_f)


def gate(g, kind):
    """SoftAdaLN's residual gate τ(c): the official sigmoid(g), its bias starting at 6, or the residual 1 + g."""
    return torch.sigmoid(g) if kind == "sigmoid" else 1 + g


#################################################################################
#                     Checkpoint loading (MindSpore .ckpt, .pt, .safetensors)   #
#################################################################################

class CheckpointError(ValueError):
    pass


# MindSpore TensorProto.tensor_type -> numpy dtype (BFloat16 is read as int16 and viewed)
_MS_DTYPES = {"Float32": np.float32, "Float16": np.float16, "Float64": np.float64,
              "Int8": np.int8, "Int16": np.int16, "Int32": np.int32, "Int64": np.int64,
              "UInt8": np.uint8, "Bool": np.bool_, "BFloat16": np.int16}
# Optimiser state and training scalars stored beside the weights in MindSpore checkpoints
_IGNORED_PREFIXES = ("moment1.", "moment2.", "global_step", "learning_rate", "beta1_power", "beta2_power",
                     "current_iterator_step", "last_overflow_iterator_step", "scale_sense")
# CellFM weights HINGE does not use: the 80M read-depth tokens and the cell-level head (unused by the official HINGE code)
UNUSED_CELLFM = ("ST_emb", "ST_enc.", "cellwise_dec.")


def _varint(f, path):
    result, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            raise CheckpointError(f"{path}: truncated (file ends inside a field header at byte {f.tell()}); "
                                  "download the checkpoint again")
        result |= (b[0] & 0x7F) << shift
        shift += 7
        if b[0] < 0x80:
            return result


def _fields(f, end, path):
    """Yield (field number, wire type, value or (offset, length)) of one protobuf message."""
    while f.tell() < end:
        key = _varint(f, path)
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, _varint(f, path)
        elif wire == 2:
            n = _varint(f, path)
            start = f.tell()
            if start + n > end:
                raise CheckpointError(f"{path}: truncated (a field of {n} bytes at byte {start} runs past the "
                                      f"end of its message or file); download the checkpoint again")
            yield field, wire, (start, n)
            f.seek(start + n)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        else:
            raise CheckpointError(f"{path}: not a MindSpore checkpoint (wire type {wire} at byte {f.tell()})")


def _read_mindspore(path):
    """Stream a MindSpore checkpoint: `Checkpoint{repeated Value value=1}`, `Value{tag=1, tensor=2}`,
    `TensorProto{dims=1, tensor_type=2, tensor_content=3}`. A tensor split over several values with
    the same tag is concatenated into one preallocated buffer, so the file is read once."""
    out, filled, types = {}, {}, {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for field, wire, val in _fields(f, size, path):
            if field != 1 or wire != 2:
                continue
            start, n = val
            tag, tensor = None, None
            for sf, sw, sv in _fields(f, start + n, path):
                if sf == 1 and sw == 2:
                    f.seek(sv[0]); tag = f.read(sv[1]).decode()
                elif sf == 2 and sw == 2:
                    tensor = sv
            f.seek(start + n)
            if tag is None or tensor is None or tag.startswith(_IGNORED_PREFIXES):
                continue
            dims, dtype, content = [], None, None
            f.seek(tensor[0])
            for tf, tw, tv in _fields(f, tensor[0] + tensor[1], path):
                if tf == 1 and tw == 0:
                    dims.append(tv)
                elif tf == 1 and tw == 2:  # packed dims
                    f.seek(tv[0]); end = tv[0] + tv[1]
                    while f.tell() < end:
                        dims.append(_varint(f, path))
                    f.seek(end)
                elif tf == 2 and tw == 2:
                    f.seek(tv[0]); dtype = f.read(tv[1]).decode()
                elif tf == 3 and tw == 2:
                    content = tv
            if dtype not in _MS_DTYPES:
                raise CheckpointError(f"{path}: tensor {tag} has unsupported type {dtype!r}")
            if tag not in out:
                out[tag] = np.empty(int(np.prod(dims)), dtype=_MS_DTYPES[dtype]).reshape(dims)
                filled[tag], types[tag] = 0, dtype
            buf = out[tag].reshape(-1).view(np.uint8)
            if content is not None:
                if filled[tag] + content[1] > buf.size:
                    raise CheckpointError(f"{path}: tensor {tag} has more bytes than its shape {dims} holds")
                f.seek(content[0])
                f.readinto(memoryview(buf)[filled[tag]:filled[tag] + content[1]])
                filled[tag] += content[1]
            f.seek(start + n)
    incomplete = [f"{t} ({filled[t]} of {a.nbytes} bytes)" for t, a in out.items() if filled[t] != a.nbytes]
    if incomplete:
        raise CheckpointError(f"{path}: truncated: incomplete tensors {', '.join(incomplete[:3])}; "
                              "download the checkpoint again")
    if not out:
        raise CheckpointError(f"{path}: no tensors found; is this a MindSpore .ckpt?")
    return {tag: torch.from_numpy(a).view(torch.bfloat16) if types[tag] == "BFloat16" else torch.from_numpy(a)
            for tag, a in out.items()}


def load_cellfm(path):
    """Read a CellFM checkpoint (.ckpt MindSpore, .pt/.bin state dict, .safetensors) into a
    torch-named state dict (LayerNorm gamma/beta -> weight/bias, `module.` prefix stripped)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file; pass the path of a CellFM .ckpt/.pt/.safetensors")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".ckpt":
        sd = _read_mindspore(path)
    elif ext == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(path)
    elif ext in (".pt", ".pth", ".bin"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch reports truncation as a zip error
            raise CheckpointError(f"{path}: cannot be read as a torch state dict ({e}); is it truncated?") from e
        for nest in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(nest), dict):
                sd = sd[nest]
    else:
        raise CheckpointError(f"{path}: unknown checkpoint extension {ext!r}; use .ckpt, .pt, .bin or .safetensors")
    renamed = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(_IGNORED_PREFIXES) or not torch.is_tensor(v):
            continue
        k = k[:-len(".gamma")] + ".weight" if k.endswith(".gamma") else k
        k = k[:-len(".beta")] + ".bias" if k.endswith(".beta") else k
        renamed[k] = v
    return renamed


#################################################################################
#                                  Embeddings                                   #
#################################################################################

class LoRALinear(nn.Linear):
    """Linear (bias-free as CellFM's unless asked) with an optional low-rank update B·A/r (the official HINGE
    LoraBlock's 1/r scale); keeps the checkpoint names `<name>.weight`, `<name>.bias`. A and B are set by the model's
    `initialize_weights`."""
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


class ValueEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.value_enc = SoftBinFFN(dim)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, dim))  # CellFM's pre-training mask token; HINGE skips it (official HINGE code)

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


class CondNet(nn.Module):
    """c = MLP(t) + MLP(histology) + MLP(target visibility mask) (official HINGE CondNet)."""
    def __init__(self, dim, hist_dim, n_genes):
        super().__init__()
        self.t_embedder = mlp(256, dim)
        self.hist_embedder = mlp(hist_dim, dim)
        self.mask_embedder = mlp(n_genes, dim)

    def forward(self, t, hist_emb, target_visible):      # t [B], hist_emb [B, C], target_visible [B, G]
        return self.t_embedder(timestep_embedding(t)) + hist_emb + self.mask_embedder(target_visible.float())


#################################################################################
#                     Retention blocks (CellFM) with SoftAdaLN (HINGE)          #
#################################################################################

class Retention(nn.Module):
    """CellFM linear attention: ReLU q/k, per-head RMS norm, SiLU gate, no softmax (CellFM, Zeng et al. 2025)."""
    def __init__(self, dim, heads, rank=0):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.u_proj, self.o_proj = (LoRALinear(dim, dim, rank) for _ in range(5))

    def forward(self, x, key_mask=None):                 # x [B, L, D], key_mask [B, L]
        B, L, D = x.shape
        h, dh = self.heads, D // self.heads
        q = F.relu(self.q_proj(x)).view(B, L, h, dh) / math.sqrt(dh)    # [B, L, h, dh]
        k = F.relu(self.k_proj(x)).view(B, L, h, dh) / math.sqrt(dh)    # [B, L, h, dh]
        v = self.v_proj(x).view(B, L, h, dh) / math.sqrt(L - 1)         # len_scale = rsqrt(#genes)
        if key_mask is not None:                         # hidden genes are neither keys nor values
            k = k * key_mask[:, :, None, None]
            v = v * key_mask[:, :, None, None]
        kv = torch.einsum("blhd,blhe->bhde", k, v)       # [B, h, dh, dh]
        o = torch.einsum("blhd,bhde->blhe", q, kv)       # [B, L, h, dh]
        o32 = o.float()                                  # SRMSNorm per head, in float32 under autocast (official HINGE)
        o = (o32 / (o32.norm(dim=-1, keepdim=True) / math.sqrt(dh)).clamp_min(1e-12)).to(o.dtype)
        o = o.reshape(B, L, D) * F.silu(self.u_proj(x))  # [B, L, D]
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
        lam = torch.sigmoid(self.lambda_bias)
        return (1 - lam) * h + lam * n


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

    def forward(self, h, key_mask=None, c=None):         # h [B, L, D], c [B, D] or None (bare CellFM)
        if c is None:
            h = self.post_norm1(self.alpha * h + self.dropout(self.attn(h, key_mask)))
            return self.post_norm2(self.alpha * h + self.dropout(self.ffn(h)))
        if self.cond == "hist-affine-ln":
            s1, k1, s2, k2 = self.adaln(F.silu(c)).unsqueeze(1).chunk(4, dim=-1)
            h = modulate(self.post_norm1(self.alpha * h + self.dropout(self.attn(h, key_mask))), s1, k1)
            return modulate(self.post_norm2(self.alpha * h + self.dropout(self.ffn(h))), s2, k2)
        sa, ka, ga, sf, kf, gf = self.adaln(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)  # each [B, 1, D]
        a = self.attn(modulate(self.soft_norm1(h), sa, ka), key_mask)
        h = self.post_norm1(self.alpha * h + gate(ga, self.gate) * self.dropout(a))
        f = self.ffn(modulate(self.soft_norm2(h), sf, kf))
        return self.post_norm2(self.alpha * h + gate(gf, self.gate) * self.dropout(f))


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
    gate: str = "residual"         # sigmoid | residual (runs saved before the choice existed are residual)
    init: str = "cellfm"           # official (xavier_uniform everywhere, the official HINGE code) | cellfm
    backbone: str = "cellfm"       # cellfm (Hinge) | scgpt (scgpt.ScGPT); the fields below are scGPT's (its args.json)
    ffn: int = 0                   # feed-forward width d_hid
    values: str = "raw"            # value input: raw (log2(count + 1)) | binned (per-spot quantile bins) | category (bins, embedded)
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
        self.cond_net = CondNet(cfg.dim, cfg.hist_dim, cfg.n_genes)
        self.dec_norm = SoftNorm(cfg.dim, cfg.soft_norm)
        self.dec_adaln = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.initialize_weights()

    def initialize_weights(self):
        cfg = self.cfg
        loras = [m for m in self.modules() if isinstance(m, LoRALinear) and m.rank]
        if cfg.init == "official":                       # the official code's xavier_uniform on every Linear, LoRA A and B included
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
        if not cfg.id_init:                              # --no-id-init: the heads keep their Linear init, λ = 0.5
            return
        heads = [blk.adaln for blk in self.encoder if hasattr(blk, "adaln")] + [self.dec_adaln]
        for lin in heads:                                # shift = scale = 0: the untrained model is CellFM
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if cfg.cond == "softadaln" and cfg.gate == "sigmoid":
            with torch.no_grad():                        # gate biases 6: sigmoid(6) ≈ 0.9975, almost CellFM (official HINGE)
                for blk in self.encoder:
                    blk.adaln.bias.view(6, cfg.dim)[GATE_CHUNKS] = 6.0
        for n in (m for m in self.modules() if isinstance(m, SoftNorm)):  # λ = sigmoid(-12) ≈ 6e-6: SoftNorm starts as the identity
            nn.init.constant_(n.lambda_bias, -12.0)

    def embed_histology(self, hist):                     # hist [B, hist_dim] -> [B, D]; once per spot when sampling
        if hist.shape[-1] != self.cfg.hist_dim:
            raise ValueError(f"histology features have dimension {hist.shape[-1]} but the model expects "
                             f"{self.cfg.hist_dim}; use the same --features as in training")
        return self.cond_net.hist_embedder(hist)

    def forward(self, x, visible, t=None, target_visible=None, hist_emb=None):
        """x [B, G] values (hidden ones filled), visible [B, G] in {0,1}, t [B] ints,
        target_visible [B, G] genes visible after this step, hist_emb [B, D]. Returns x̂0 [B, G]."""
        B, G = x.shape
        vis = visible.to(x.dtype)
        tok = self.gene_emb[self.gene_ids][None] + self.value_enc(x) + self.zero_emb * (1 - vis)[..., None]  # [B, G, D]
        h = torch.cat([self.cls_token.expand(B, -1, -1), tok], dim=1)            # [B, 1+G, D]
        key_mask = torch.cat([vis.new_ones(B, 1), vis], dim=1)                   # [B, 1+G]
        c = None if hist_emb is None else self.cond_net(t, hist_emb, target_visible)  # [B, D]
        for i, blk in enumerate(self.encoder):           # first half: hidden genes are not keys (CellFM)
            h = blk(h, key_mask if i < len(self.encoder) // 2 else None, c)
        h = h[:, 1:]                                     # [B, G, D]
        if c is not None and self.cfg.cond == "softadaln":
            shift, scale = self.dec_adaln(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
            h = modulate(self.dec_norm(h), shift, scale)
        return self.value_dec(h)                         # [B, G]

    def backbone_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if is_backbone_key(k)}


class Backbone(NamedTuple):
    cfg: Config
    tokens: np.ndarray             # token id of each selected gene
    weights: dict                  # backbone tensors by our names; None: random weights


def prepare_backbone(preset, ckpt, genes, gene_ids, **kw):
    """Config, gene token ids and weights of a backbone: `ckpt` a CellFM file (the preset sets the shape) or an
    official scGPT folder (its tensors and args.json set the shape; preset None picks scgpt); None = random weights.
    `genes` are the selected symbols, `gene_ids` the ids the slices store; kw the remaining Config fields."""
    if preset is None:
        preset = "scgpt" if ckpt and os.path.isdir(ckpt) else "small"
    if make_config(preset).backbone == "scgpt":
        import scgpt
        return scgpt.prepare(preset, ckpt, genes, gene_ids, **kw)
    if ckpt and os.path.isdir(ckpt):
        raise CheckpointError(f"{ckpt} is a folder (an scGPT checkpoint?) but --preset {preset} is a CellFM backbone; "
                              "pass --preset scgpt, or leave --preset out")
    from common import gene_tokens
    tokens, vocab = gene_tokens(gene_ids, make_config(preset).vocab)
    return Backbone(make_config(preset, vocab=vocab, **kw), tokens, load_cellfm(ckpt) if ckpt else None)


def build_model(cfg, gene_ids):
    """The model a config describes: HINGE on CellFM (Hinge) or on scGPT (scgpt.ScGPT), the same interface."""
    if cfg.backbone == "scgpt":
        import scgpt
        return scgpt.ScGPT(cfg, gene_ids)
    return Hinge(cfg, gene_ids)


def is_backbone_key(name):
    return not name.startswith(("cond_net.", "dec_")) and ".adaln." not in name and \
        ".soft_norm" not in name and "lora_" not in name


def shape_hint(sd, cfg):
    """Why a checkpoint does not fit: another width or depth (name the preset that has it) or another vocabulary."""
    width = sd["gene_emb"].shape[1] if "gene_emb" in sd else None
    layers = len({k.split(".")[1] for k in sd if k.startswith("encoder.")})
    if (width, layers) == (cfg.dim, cfg.layers):
        return "; the checkpoint is for another gene vocabulary (prepare the data with the vocabulary it was trained on)"
    fits = [p for p, make in PRESETS.items() if (make().backbone, make().dim, make().layers) == ("cellfm", width, layers)]
    return (f"; the checkpoint is a {width}-wide, {layers}-layer backbone and this model {cfg.dim}-wide, {cfg.layers}-layer: "
            + (f"pass --preset {' or '.join(fits)}" if fits else "no preset has that shape"))


def load_backbone(model, sd, path="checkpoint"):
    """Copy CellFM weights into `model`; mis-shaped or missing backbone keys are errors, named.
    Returns (unused CellFM keys, unexpected keys)."""
    own = model.backbone_state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: mis-shaped keys: " + "; ".join(bad[:5]) + shape_hint(sd, model.cfg))
    missing = sorted(set(own) - set(sd))
    if missing:
        raise CheckpointError(f"{path}: missing backbone keys {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    extra = sorted(set(sd) - set(own))
    with torch.no_grad():
        for k in own:
            model.get_parameter(k).copy_(sd[k])
    return [k for k in extra if k.startswith(UNUSED_CELLFM)], [k for k in extra if not k.startswith(UNUSED_CELLFM)]


#################################################################################
#                 Checkpoints of the official HINGE code (donghaifang/HINGE)    #
#################################################################################

# our name -> the official one (its models.py, retentionlayer.py); the first rule that matches applies
OFFICIAL_NAMES = [
    (r"^encoder\.(\d+)\.adaln\.", r"retentionblocks.\1.adaln.proj."),
    (r"^encoder\.(\d+)\.soft_norm(\d)\.lambda_bias$", r"retentionblocks.\1.pre_norm\2._lambda_bias"),
    (r"^encoder\.(\d+)\.(attn|ffn)\.(\w)_proj\.lora_(A|B)$", r"retentionblocks.\1.\2.lora_\3.\4.weight"),
    (r"^encoder\.", "retentionblocks."),
    (r"^cond_net\.t_embedder\.", "cond_embed.time."),
    (r"^cond_net\.hist_embedder\.", "cond_embed.label."),
    (r"^cond_net\.mask_embedder\.", "cond_embed.mask."),
    (r"^dec_norm\.lambda_bias$", "final_layer.pre_norm._lambda_bias"),
    (r"^dec_adaln\.", "final_layer.proj."),
    (r"^value_dec\.", "final_layer."),
]
OURS_ONLY = ("value_enc.mask_emb",)                     # CellFM's pre-training mask token: the official model drops it


def official_name(name):
    for pattern, repl in OFFICIAL_NAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def official_config(sd, heads=None, gate="sigmoid"):
    """The shape of an official HINGE model, read off its tensors: width and layers from the blocks,
    vocabulary rows from gene_emb, genes from the mask MLP, heads = width / 32 as in CellFM."""
    need = ["gene_emb", "cond_embed.label.0.weight", "cond_embed.mask.0.weight", "gg"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(f"not an official HINGE checkpoint: no {', '.join(absent)}")
    rows, dim = sd["gene_emb"].shape
    lora = sd.get("retentionblocks.0.attn.lora_q.A.weight")
    return Config(dim=dim, layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("retentionblocks.")),
                  heads=heads or dim // 32, vocab=rows - 1, n_genes=sd["cond_embed.mask.0.weight"].shape[1],
                  hist_dim=sd["cond_embed.label.0.weight"].shape[1], gate=gate, init="official",
                  lora_rank=0 if lora is None else lora.shape[0])


def import_official(sd, cfg):
    """An official HINGE state dict -> our model, every tensor mapped by name; a missing, unexpected
    or mis-shaped tensor is an error that names it."""
    net = Hinge(cfg, sd["gg"])
    own = {k: v for k, v in net.state_dict().items() if k not in OURS_ONLY}
    names = {official_name(k): k for k in own}
    missing = sorted(set(names) - set(sd))
    unexpected = sorted(set(sd) - set(names) - {"gg"})
    bad = [f"{o} {tuple(sd[o].shape)} (expected {tuple(own[k].shape)})" for o, k in names.items()
           if o in sd and sd[o].numel() != own[k].numel()]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
        if keys:
            raise CheckpointError(f"{what} tensors: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} "
                                  f"({len(keys)} in all)")
    with torch.no_grad():
        for o, k in names.items():
            own[k].copy_(sd[o].reshape(own[k].shape))   # the official λ biases are scalars, ours [1]
        if cfg.gate == "residual":                       # official use_sigmoid=False gates with g, ours with 1 + g
            for blk in net.encoder:
                blk.adaln.bias.view(6, cfg.dim)[GATE_CHUNKS] -= 1
        net.value_enc.mask_emb.zero_()
    return net


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
            p.requires_grad = not is_backbone_key(name) or name.startswith(("value_dec.", "decoder."))  # CellFM's, scGPT's
        elif variant == "backbone-lora":
            p.requires_grad = not is_backbone_key(name) or "lora_" in name
        else:
            p.requires_grad = not is_backbone_key(name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#################################################################################
#                               Masked diffusion                                #
#################################################################################

def hidden_counts(schedule, T, G):
    """Genes hidden at t = 0..T, counted exactly as the official scheduler: ⌊γ(t)·G⌋ in float32, γ = 1 - ᾱ,
    in its order of operations (float64 gives one gene more or less at some G, t); pow and cos are rounded
    correctly to float32, as a scalar torch call does (the vectorised CPU pow is one ulp off at a few G, T = 100)."""
    t = torch.arange(T + 1, dtype=torch.float32)
    if schedule == "linear":
        g = t / float(T)
    elif schedule == "cosine":
        g = 0.5 * (1 - torch.cos((math.pi * t / float(T)).double()).float())
    elif schedule == "poly-auto" or schedule.startswith("power:"):
        zeta = (min(max(math.log(1 / float(G)) / math.log(1.0 / float(max(2, T))), 1.05), 4.0)  # ζ = log_T G: exactly
                if schedule == "poly-auto" else float(schedule.split(":", 1)[1]))          # one gene visible at t = T-1
        g = 1 - ((1 - t / float(T)).double() ** zeta).float()
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use poly-auto, linear, cosine or power:<zeta>")
    return (g.clamp(0, 1) * G).long()


class MaskedDiffusion:
    """Nested random gene orders: at step t the first ⌊γ(t)·G⌋ genes of a sample's order are hidden."""
    def __init__(self, G, T=50, schedule="poly-auto", fill="gauss", loss_norm="sample"):
        self.G, self.T, self.fill, self.loss_norm = G, T, fill, loss_norm
        self.n_hidden = hidden_counts(schedule, T, G)    # [T+1]

    def curriculum_cap(self, max_hidden=0.2):
        """Largest t whose hidden fraction is at most `max_hidden` (≥ 1): the warm-up range."""
        ok = (self.n_hidden <= max_hidden * self.G).nonzero().flatten()
        return max(int(ok.max()), 1)

    def gene_ranks(self, B, device, generator=None):
        return torch.rand(B, self.G, device=device, generator=generator).argsort(1).argsort(1)  # [B, G]

    def visible(self, ranks, t):                         # ranks [B, G], t [B] -> [B, G] bool
        return ranks >= self.n_hidden.to(ranks.device)[t][:, None]

    def fill_like(self, x, generator=None):
        if self.fill == "zero":
            return torch.zeros_like(x)
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)

    def loss(self, model, x0, hist_emb, t_max=None, mask_ratio="schedule"):
        """MSE on the genes revealed between t and t-1 (official `elboloss`); with
        mask_ratio='uniform' (RandMask) a U(0,1) share is hidden and the loss covers all of it.
        loss_norm='sample' averages each sample's genes first, so every t weighs the same; 'batch'
        (the official code) divides by the batch's gene count, so steps that reveal few genes,
        where histology matters most, weigh little (demo: PCC-50 0.57 vs 0.74 with 'sample')."""
        B, dev = x0.shape[0], x0.device
        ranks = self.gene_ranks(B, dev)
        if mask_ratio == "uniform":
            n = (torch.rand(B, device=dev) * self.G).ceil().long().clamp(1, self.G)
            t = torch.searchsorted(self.n_hidden.to(dev), n).clamp(1, self.T)
            vis = ranks >= n[:, None]
            target = torch.ones_like(vis)
        else:
            t = torch.randint(1, (t_max or self.T) + 1, (B,), device=dev)
            vis, target = self.visible(ranks, t), self.visible(ranks, t - 1)
        xt = torch.where(vis, x0, self.fill_like(x0))
        pred = model(xt, vis, t, target, hist_emb)
        w = (target & ~vis).float()                      # newly revealed genes
        err = (pred.float() - x0) ** 2 * w
        if self.loss_norm == "batch":
            return err.sum() / w.sum().clamp_min(1)
        return (err.sum(1) / w.sum(1).clamp_min(1)).mean()


class GaussianDiffusion:
    """Gauss-Diff ablation: DDPM on the values (cosine ᾱ), the backbone predicts x0, DDIM sampling."""
    def __init__(self, G, T=50):
        self.G, self.T = G, T
        s = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2   # Nichol & Dhariwal cosine schedule
        self.alpha_bar = (f / f[0]).clamp(1e-5, 1.0).float()

    def loss(self, model, x0, hist_emb, t_max=None, mask_ratio="schedule"):
        B, dev = x0.shape[0], x0.device
        t = torch.randint(1, (t_max or self.T) + 1, (B,), device=dev)
        ab = self.alpha_bar.to(dev)[t][:, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
        ones = torch.ones_like(x0, dtype=torch.bool)
        pred = model(xt, ones, t, ones, hist_emb)
        return ((pred.float() - x0) ** 2).mean()


def make_diffusion(objective, G, T=50, schedule="poly-auto", fill="gauss", loss_norm="sample"):
    """The training/sampling process of a run: masked diffusion (HINGE) or Gauss-Diff (ablation)."""
    if objective == "masked":
        return MaskedDiffusion(G, T, schedule, fill, loss_norm)
    return GaussianDiffusion(G, T)


#################################################################################
#                                    Sampler                                    #
#################################################################################

def step_times(T, K):
    """K+1 evenly spaced steps T = τ0 > τ1 > ... > τK = 0."""
    if not 1 <= K <= T:
        raise ValueError(f"step budget K={K} must be between 1 and T={T}")
    return [round(T * (1 - k / K)) for k in range(K + 1)]


@torch.no_grad()
def generate(model, diffusion, hist, K, n_samples=1, generator=None, record=(), cache=True):
    """Generate expression for one batch of spots: hist [B, hist_dim] -> (mean [B, G],
    samples [S, B, G], recorded x̂0 {step index k: [B, G]} averaged over samples).
    With `cache` the histology embedding is computed once per spot; cache=False recomputes it
    at every step (the naive sampler, same result; bench/speed.py measures both)."""
    B, G, S = hist.shape[0], diffusion.G, n_samples
    taus = step_times(diffusion.T, K)
    h = model.embed_histology(hist).repeat(S, 1)       # [S·B, D]
    cond = (lambda: h) if cache else (lambda: model.embed_histology(hist).repeat(S, 1))
    dev = h.device
    steps = {}
    if isinstance(diffusion, GaussianDiffusion):
        ab = diffusion.alpha_bar.to(dev)
        x = torch.randn(S * B, G, device=dev, generator=generator)
        ones = torch.ones(S * B, G, dtype=torch.bool, device=dev)
        for k, (t, t_next) in enumerate(zip(taus[:-1], taus[1:])):
            tt = torch.full((S * B,), t, device=dev)
            x0 = model(x, ones, tt, ones, cond()).float()
            eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
            x = x0 if t_next == 0 else ab[t_next].sqrt() * x0 + (1 - ab[t_next]).sqrt() * eps  # DDIM, η = 0
            if k in record:
                steps[k] = x0.view(S, B, G).mean(0)
    else:
        ranks = diffusion.gene_ranks(S * B, dev, generator)
        x = diffusion.fill_like(torch.empty(S * B, G, device=dev), generator)
        for k, (t, t_next) in enumerate(zip(taus[:-1], taus[1:])):
            tt = torch.full((S * B,), t, device=dev)
            vis, nxt = diffusion.visible(ranks, tt), diffusion.visible(ranks, tt.new_full((S * B,), t_next))
            # condition on m_{t-1} as in training even when jumping to t_next: an unseen, larger target mask
            # biased the predictions (validation, Her2ST fold C2, K=1: mean r 0.491 -> 0.504, MSE 1.19 -> 1.08)
            pred = model(x, vis, tt, diffusion.visible(ranks, tt - 1), cond()).float()
            x = torch.where(nxt & ~vis, pred, x)          # reveal the scheduled genes, keep revealed ones fixed
            if k in record:
                steps[k] = torch.where(vis, x, pred).view(S, B, G).mean(0)
    samples = x.view(S, B, G)
    return samples.mean(0), samples, steps


#################################################################################
#                                    Presets                                    #
#################################################################################

def cellfm_800m(**kw): return Config(**{"dim": 1536, "layers": 40, "heads": 48, "vocab": 24078, **kw})
def cellfm_80m(**kw): return Config(**{"dim": 1536, "layers": 2, "heads": 48, "vocab": 27855, **kw})
def small(**kw): return Config(**{"dim": 128, "layers": 4, "heads": 4, **kw})
def tiny(**kw): return Config(**{"dim": 32, "layers": 2, "heads": 2, "vocab": 63, **kw})


# scGPT (scgpt.py): the whole-human model's shape (its args.json; <pad>, <cls>, <eoc> the last three of 60,697 rows),
# and random ones the size of small and tiny that take log2(count + 1) as it is
def scgpt_human(**kw): return Config(**{"backbone": "scgpt", "dim": 512, "layers": 12, "heads": 8, "ffn": 512, "vocab": 60697,
                                        "cls_token": 60695, "values": "binned", "n_bins": 51, "dropout": 0.2, **kw})
def scgpt_small(**kw): return scgpt_human(**{"dim": 128, "layers": 4, "heads": 4, "ffn": 128, "values": "raw", "dropout": 0.1, **kw})
def scgpt_tiny(**kw): return scgpt_human(**{"dim": 32, "layers": 2, "heads": 2, "ffn": 32, "values": "raw", "dropout": 0.1, **kw})


PRESETS = {"cellfm-800m": cellfm_800m, "cellfm-80m": cellfm_80m, "small": small, "tiny": tiny,
           "scgpt": scgpt_human, "scgpt-small": scgpt_small, "scgpt-tiny": scgpt_tiny}


def make_config(preset, **kw):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset](**kw)


def config_dict(cfg):
    return asdict(cfg)


def convert(src, dst):
    """A CellFM checkpoint -> .safetensors, so later loads are fast and need no protobuf parsing."""
    from safetensors.torch import save_file
    sd = load_cellfm(src)
    save_file({k: v.contiguous() for k, v in sd.items()}, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    print(f"wrote {dst}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values")


def import_hinge(a):
    """An official HINGE best_weight.pt -> a run sample.py and evaluate.py use as they are (README
    "Using the authors' checkpoints"). The official code feeds raw UNI + CONCH embeddings, so the
    run standardises nothing (mean 0, std 1), and trains with T = 50 and the poly-auto schedule."""
    from common import UserError, atomic_path, read_gene_list, read_vocab
    if not os.path.isfile(a.import_hinge):
        raise UserError(f"{a.import_hinge}: no such checkpoint")
    ck = torch.load(a.import_hinge, map_location="cpu", weights_only=True)
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{a.import_hinge}: not an official HINGE checkpoint (expected {{'model', 'opt', 'epoch'}})")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    genes, vocab = read_gene_list(a.genes), read_vocab(a.vocab)
    unknown = [g for g in genes if g not in vocab]
    if unknown:
        raise UserError(f"{a.vocab}: {len(unknown)} listed genes are not in the vocabulary: {', '.join(unknown[:5])}")
    try:
        cfg = official_config(sd, a.heads, a.gate)
        tokens, gg = torch.tensor([vocab[g] for g in genes]), sd["gg"].long()
        if len(tokens) != len(gg):
            raise CheckpointError(f"it has {len(gg)} genes (gg) and {a.genes} lists {len(genes)}")
        if not torch.equal(tokens, gg):
            i = int((tokens != gg).nonzero()[0])
            raise CheckpointError(f"gene {i} of {a.genes}, {genes[i]}, has token id {int(tokens[i])} in {a.vocab} but "
                                  f"the checkpoint's gg holds {int(gg[i])}: another gene order or vocabulary file")
        net = import_official(sd, cfg)
    except CheckpointError as e:
        raise UserError(f"{a.import_hinge}: {e}") from e
    feats = a.features.split(",")
    run = {"config": config_dict(cfg), "gene_tokens": tokens.tolist(), "genes": genes, "features": feats,
           "feat_mean": np.zeros(cfg.hist_dim, np.float32), "feat_std": np.ones(cfg.hist_dim, np.float32),
           "test_slice": None, "train_slices": [], "objective": "masked", "schedule": "poly-auto", "fill": "gauss",
           "T": a.T, "variant": "hinge", "backbone_ckpt": None, "pixel_size_um": None, "model": net.state_dict(),
           "imported_from": os.path.abspath(a.import_hinge), "epoch": ck.get("epoch"), "args": vars(a)}
    with atomic_path(a.out) as tmp:
        torch.save(run, tmp)
    print(f"wrote {a.out}: {cfg.layers} layers, width {cfg.dim}, {cfg.heads} heads, {cfg.n_genes} genes, "
          f"{cfg.hist_dim}-d features ({a.features}), {cfg.gate} gate" + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""))


if __name__ == "__main__":
    import argparse
    from common import UserError, run
    p = argparse.ArgumentParser(description="Checkpoint tools: convert a CellFM checkpoint to .safetensors, or import "
                                            "an official HINGE checkpoint as a run for sample.py.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--convert", nargs=2, metavar=("IN", "OUT"), help="CellFM .ckpt/.pt/.bin -> .safetensors")
    g.add_argument("--import-hinge", metavar="PT", help="official HINGE best_weight.pt ({'model', 'opt', 'epoch'})")
    p.add_argument("--genes", help="import: its gene list, one symbol per line in training order (used_selected_gene_list.txt)")
    p.add_argument("--vocab", help="import: CellFM gene_info.csv it was trained with (token id = row + 1)")
    p.add_argument("--out", help="import: the run checkpoint to write, e.g. RUN/best.pt")
    p.add_argument("--heads", type=int, help="import: attention heads (default width / 32, as CellFM)")
    p.add_argument("--gate", choices=["sigmoid", "residual"], default="sigmoid",
                   help="import: the official use_sigmoid=True (default) or use_sigmoid=False")
    p.add_argument("--features", default="uni,conch", help="import: its histology features, in order (default uni,conch)")
    p.add_argument("--T", type=int, default=50, help="import: its --num_timesteps (default 50)")
    a = p.parse_args()

    def main():
        if a.convert:
            try:
                convert(*a.convert)
            except CheckpointError as e:
                raise UserError(str(e)) from e
            return
        missing = [f"--{k}" for k in ("genes", "vocab", "out") if not getattr(a, k)]
        if missing:
            raise UserError(f"--import-hinge needs {', '.join(missing)}")
        import_hinge(a)
    run(main)
