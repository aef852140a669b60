"""Checkpoint plumbing beside model.py (as DiT keeps download.py beside its models): CellFM's released
weights read without MindSpore, their conversion to .safetensors, and checkpoints of the official HINGE
training code imported as runs that sample.py and evaluate.py use as they are.

    python checkpoints.py --convert base_weight.ckpt cellfm_800m.safetensors
    python checkpoints.py --import-hinge best_weight.pt --genes used_selected_gene_list.txt \
        --vocab gene_info.csv --out runs/official/best.pt
"""
import os
import re
from typing import NamedTuple

import numpy as np
import torch

import model as M
from common import HUB_PREFIX, UserError, atomic_path, gene_tokens, read_gene_list, read_vocab, resolve_weights, run


#################################################################################
#                 CellFM checkpoints (MindSpore .ckpt, .pt, .safetensors)       #
#################################################################################

class CheckpointError(UserError):
    """A checkpoint that does not fit: printed as one line naming the tensor or file."""


# CellFM weights HINGE does not use: the 80M read-depth tokens and the cell-level head (unused by the official HINGE code)
UNUSED_CELLFM = ("ST_emb", "ST_enc.", "cellwise_dec.")


# MindSpore TensorProto.tensor_type -> numpy dtype (BFloat16 is read as int16 and viewed)
_MS_DTYPES = {"Float32": np.float32, "Float16": np.float16, "Float64": np.float64,
              "Int8": np.int8, "Int16": np.int16, "Int32": np.int32, "Int64": np.int64,
              "UInt8": np.uint8, "Bool": np.bool_, "BFloat16": np.int16}
# Optimiser state and training scalars stored beside the weights in MindSpore checkpoints
_IGNORED_PREFIXES = ("moment1.", "moment2.", "global_step", "learning_rate", "beta1_power", "beta2_power",
                     "current_iterator_step", "last_overflow_iterator_step", "scale_sense")


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


def shape_hint(sd, cfg):
    """Why a checkpoint does not fit: another width or depth (name the preset that has it) or another vocabulary."""
    width = sd["gene_emb"].shape[1] if "gene_emb" in sd else None
    layers = len({k.split(".")[1] for k in sd if k.startswith("encoder.")})
    if (width, layers) == (cfg.dim, cfg.layers):
        return "; the checkpoint is for another gene vocabulary (prepare the data with the vocabulary it was trained on)"
    fits = [p for p, make in M.PRESETS.items() if (make().backbone, make().dim, make().layers) == ("cellfm", width, layers)]
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


class Backbone(NamedTuple):
    cfg: M.Config
    tokens: np.ndarray             # token id of each selected gene
    weights: dict                  # backbone tensors by our names; None: random weights


def resolve_backbone(spec):
    """--backbone-ckpt -> a local path. Through the Hugging Face cache only with the explicit prefix:
    hf-hub:<owner>/<name> is an scGPT folder (its three files), hf-hub:<owner>/<name>/<file> one CellFM file."""
    if not spec or not spec.startswith(HUB_PREFIX):
        return spec
    parts = spec[len(HUB_PREFIX):].split("/", 2)
    repo = HUB_PREFIX + "/".join(parts[:2])
    if len(parts) == 3:
        return resolve_weights(repo, parts[2])
    import scgpt                                         # here: scgpt imports this module
    return os.path.dirname([resolve_weights(repo, f) for f in scgpt.FILES][0])  # one snapshot folder holds all three


def prepare_backbone(preset, ckpt, genes, gene_ids, **kw):
    """Config, gene token ids and weights of a backbone: `ckpt` a CellFM file (the preset sets the shape) or an
    official scGPT folder (its tensors and args.json set the shape; preset None picks scgpt), either by path or
    by hf-hub: id; None = random weights. `genes` are the selected symbols, `gene_ids` the ids the slices store;
    kw the remaining Config fields."""
    ckpt = resolve_backbone(ckpt)
    if preset is None:
        preset = "scgpt" if ckpt and os.path.isdir(ckpt) else "small"
    if M.make_config(preset).backbone == "scgpt":
        import scgpt
        return scgpt.prepare(preset, ckpt, genes, gene_ids, **kw)
    if ckpt and os.path.isdir(ckpt):
        raise CheckpointError(f"{ckpt} is a folder (an scGPT checkpoint?) but --preset {preset} is a CellFM backbone; "
                              "pass --preset scgpt, or leave --preset out")
    tokens, vocab = gene_tokens(gene_ids, M.make_config(preset).vocab)
    return Backbone(M.make_config(preset, vocab=vocab, **kw), tokens, load_cellfm(ckpt) if ckpt else None)


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
    return M.Config(dim=dim, layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("retentionblocks.")),
                  heads=heads or dim // 32, vocab=rows - 1, n_genes=sd["cond_embed.mask.0.weight"].shape[1],
                  hist_dim=sd["cond_embed.label.0.weight"].shape[1], gate=gate, init="official",
                  lora_rank=0 if lora is None else lora.shape[0])


def import_official(sd, cfg):
    """An official HINGE state dict -> our model, every tensor mapped by name; a missing, unexpected
    or mis-shaped tensor is an error that names it."""
    net = M.Hinge(cfg, sd["gg"])
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
                blk.adaln.bias.view(6, cfg.dim)[M.GATE_CHUNKS] -= 1
        net.value_enc.mask_emb.zero_()
    return net


#################################################################################
#                                  Commands                                     #
#################################################################################

def convert(src, dst):
    """A CellFM checkpoint -> .safetensors, so later loads are fast and need no protobuf parsing."""
    from safetensors.torch import save_file
    sd = load_cellfm(src)
    with atomic_path(dst) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    print(f"wrote {dst}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values")


def import_hinge(a):
    """An official HINGE best_weight.pt -> a run sample.py and evaluate.py use as they are (README
    "Using the authors' checkpoints"). The official code feeds raw UNI + CONCH embeddings, so the
    run standardises nothing (mean 0, std 1), and trains with T = 50 and the poly-auto schedule."""
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
    M.save_run(a.out, net, genes, feats, np.zeros(cfg.hist_dim, np.float32), np.ones(cfg.hist_dim, np.float32),
               T=a.T, imported_from=os.path.abspath(a.import_hinge), epoch=ck.get("epoch"), args=vars(a))
    print(f"wrote {a.out}: {cfg.layers} layers, width {cfg.dim}, {cfg.heads} heads, {cfg.n_genes} genes, "
          f"{cfg.hist_dim}-d features ({a.features}), {cfg.gate} gate" + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""))


def main():
    import argparse
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
    if a.convert:
        return convert(*a.convert)
    missing = [f"--{k}" for k in ("genes", "vocab", "out") if not getattr(a, k)]
    if missing:
        raise UserError(f"--import-hinge needs {', '.join(missing)}")
    import_hinge(a)


if __name__ == "__main__":
    run(main)
