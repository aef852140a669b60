"""Checkpoints, beside model.py (as DiT keeps download.py beside its models): run files, the backbones'
weights (CellFM's released files read without MindSpore, scGPT's official folder read and written by key
name) and weights taken from a path or the Hugging Face cache. convert.py turns files made elsewhere into them."""
import json
import os
import socket
from dataclasses import asdict
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError)
from safetensors.torch import load_file

import model as M
from common import UserError, atomic_path
from diffusion import make_diffusion
from folds import Neighbours, SlideSpace
from scgpt import ScGPT


class CheckpointError(UserError):
    """A checkpoint that does not fit: printed as one line naming the tensor or file."""


#################################################################################
#                                Weights from the hub                           #
#################################################################################

HUB_PREFIX = "hf-hub:"          # timm's form of a Hugging Face model id: hf-hub:<owner>/<name>


def hub_reachable(timeout=3):
    """Whether the hub's host answers one TCP connection (offline mode: no; behind a proxy: assumed yes)."""
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def resolve_weights(spec, filename):
    """A weights argument -> a local file. `hf-hub:<owner>/<name>` (as timm users write it) is `filename`
    of that Hugging Face repository, taken from the hub's cache or downloaded into it; anything else
    is a path, returned as given: nothing is fetched without the explicit prefix."""
    if not spec.startswith(HUB_PREFIX):
        return spec
    repo = spec[len(HUB_PREFIX):]
    login = (f"accept the model's terms at https://huggingface.co/{repo} (gated models) and log in with "
             "`hf auth login` "
             "(`huggingface-cli login` before huggingface_hub 1.0)")
    try:
        try:
            return hf_hub_download(repo, filename, local_files_only=True)  # the cache first, without the network
        except LocalEntryNotFoundError:
            if not hub_reachable():                      # else hf_hub_download retries for half a minute
                raise
        return hf_hub_download(repo, filename)
    except GatedRepoError as e:                          # before its parent class RepositoryNotFoundError
        raise UserError(f"{spec}: gated model, access refused; {login}") from e
    except RepositoryNotFoundError as e:
        raise UserError(f"{spec}: no such repository on the Hugging Face hub, or a private/gated one; {login}") from e
    except LocalEntryNotFoundError as e:                 # offline (HF_HUB_OFFLINE=1) or no connection, and not cached
        raise UserError(f"{spec}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                        f"cannot be reached; online, {login}, then run again; or download {filename} yourself "
                        "and pass its path instead") from e
    except EntryNotFoundError as e:
        raise UserError(f"{spec}: the repository has no file {filename}; is it the right model?") from e
    except HFValidationError as e:
        raise UserError(f"{spec}: not a hub id; write hf-hub:<owner>/<name>, e.g. hf-hub:MahmoodLab/UNI") from e


#################################################################################
#                  CellFM checkpoints (MindSpore .ckpt, .pt, .safetensors)      #
#################################################################################

# CellFM weights HINGE does not use (nor does the official HINGE code): the 80M read-depth tokens, the cell-level head
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
        return ("; the checkpoint is for another gene vocabulary (prepare the data with the vocabulary it was "
                "trained on)")
    fits = [p for p, make in M.PRESETS.items()
            if (make().backbone, make().dim, make().layers) == ("cellfm", width, layers)]
    return (f"; the checkpoint is a {width}-wide, {layers}-layer backbone and this model {cfg.dim}-wide, "
            f"{cfg.layers}-layer: "
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
#         scGPT's checkpoint folder (best_model.pt, args.json, vocab.json)      #
#################################################################################

FILES = ("best_model.pt", "args.json", "vocab.json")


# scGPT heads HINGE does not use: gene-expression-from-cell-embedding (MVC), cell-type classifier, zero-probability head
IGNORED = ("mvc_decoder.", "cls_decoder.", "decoder.zero_logit.")


class ScGPTCheckpoint(NamedTuple):
    path: str
    state: dict                    # tensors by our (torch's) names, the IGNORED heads left out
    shape: dict                    # Config fields the checkpoint sets
    vocab: dict                    # token -> row of encoder.embedding


def is_special(token):
    """scGPT's special tokens (<pad>, <cls>, <eoc>, ...): no gene symbol is written in angle brackets."""
    return token.startswith("<") and token.endswith(">")


def our_name(key):
    """An official key -> ours: DDP's `module.` and the flash-attention wrapper's `_impl.` dropped, flash-attention's
    packed `self_attn.Wqkv.{weight,bias}` -> torch's `self_attn.in_proj_{weight,bias}` (same q, k, v row order)."""
    key = key[len("module."):] if key.startswith("module.") else key
    return key.replace("._impl.", ".").replace(".Wqkv.weight", ".in_proj_weight").replace(".Wqkv.bias", ".in_proj_bias")


def read_json(path, kind):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({kind})")
    return obj


def checkpoint_shape(folder, state, args, vocab):
    """The Config fields an official checkpoint sets: widths, layers and vocabulary rows from its tensors,
    heads, value input and dropout from args.json, the <cls> row from vocab.json."""
    if "encoder.embedding.weight" not in state:
        raise CheckpointError(f"{folder}/best_model.pt: no encoder.embedding.weight; not an scGPT state dict")
    rows, dim = state["encoder.embedding.weight"].shape
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer_encoder.layers.")})
    if not layers or layers != list(range(len(layers))) or "transformer_encoder.layers.0.linear1.weight" not in state:
        raise CheckpointError(f"{folder}/best_model.pt: transformer layers {layers[:5]} are incomplete; "
                              "not an scGPT state dict")
    heads, style = args.get("nheads"), args.get("input_emb_style", "continuous")
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        raise CheckpointError(f"{folder}/args.json: nheads {heads!r} does not divide the width {dim}")
    if style not in ("continuous", "category"):
        raise CheckpointError(f"{folder}/args.json: input_emb_style {style!r} is not supported "
                              "(continuous or category)")
    if "<cls>" not in vocab:
        raise CheckpointError(f"{folder}/vocab.json: no <cls> token")
    # input_style: scGPT's pre-training default is binned (the values the whole-human model saw)
    values = "category" if style == "category" else "binned" if args.get("input_style", "binned") == "binned" else "raw"
    n_bins = int(args.get("n_bins", 51))
    return {"dim": dim, "layers": len(layers), "heads": heads, "vocab": rows, "cls_token": int(vocab["<cls>"]),
            "ffn": state["transformer_encoder.layers.0.linear1.weight"].shape[0], "values": values, "n_bins": n_bins,
            "pad_value": int(args.get("pad_value", n_bins if style == "category" else -2)),
            "dropout": float(args.get("dropout", 0.2))}


def read_checkpoint(folder):
    """An official scGPT folder -> ScGPTCheckpoint; flash-attention and torch names alike. Raises CheckpointError."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder; an scGPT checkpoint is the folder that holds "
                              f"{', '.join(FILES)}")
    absent = [f for f in FILES if not os.path.isfile(os.path.join(folder, f))]
    if absent:
        raise CheckpointError(f"{folder}: no {', '.join(absent)}; an scGPT checkpoint folder holds {', '.join(FILES)}")
    args = read_json(os.path.join(folder, "args.json"), "the model's arguments")
    vocab = read_json(os.path.join(folder, "vocab.json"), "token -> id")
    if not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
        raise CheckpointError(f"{folder}/vocab.json: ids must be non-negative integers")
    pt = os.path.join(folder, "best_model.pt")
    try:
        raw = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:                               # torch reports truncation as a zip error
        raise CheckpointError(f"{pt}: cannot be read as a torch state dict ({str(e).splitlines()[0]}); "
                              "is it truncated? download it again") from e
    if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
        raise CheckpointError(f"{pt}: not a state dict of tensors")
    state = {}
    for k, v in raw.items():
        k = our_name(k)
        if not k.startswith(IGNORED):
            state[k] = v
    return ScGPTCheckpoint(folder, state, checkpoint_shape(folder, state, args, vocab), vocab)


def check_tensors(ck, cfg, tokens):
    """Every tensor of the checkpoint is a backbone tensor of the model, every backbone tensor is in the
    checkpoint, shapes agree: else CheckpointError naming them (the model is built on the meta device)."""
    with torch.device("meta"):
        own = ScGPT(cfg, tokens).backbone_state_dict()
    missing = sorted(set(own) - set(ck.state))
    unexpected = sorted(set(ck.state) - set(own))
    bad = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in ck.state.items()
           if k in own and v.shape != own[k].shape]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
        if keys:
            raise CheckpointError(f"{ck.path}/best_model.pt: {what} tensors: {', '.join(keys[:5])}"
                                  f"{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)")


def checkpoint_tokens(ck, genes, gene_ids):
    """The selected genes' rows in vocab.json, by symbol; slices prepared with a vocabulary must store the same ids."""
    where = os.path.join(ck.path, "vocab.json")
    unknown = [g for g in genes if g not in ck.vocab or is_special(g)]
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} of the {len(genes)} selected genes are not in it "
                              f"({', '.join(unknown[:5])}); prepare the data with --vocab {where}")
    tokens = np.array([ck.vocab[g] for g in genes], dtype=np.int64)
    gene_ids = np.asarray(gene_ids)
    if gene_ids.any() and not np.array_equal(gene_ids, tokens):  # all 0: prepared without a vocabulary
        i = int(np.flatnonzero(gene_ids != tokens)[0])
        raise CheckpointError(f"{where} gives {genes[i]} the id {tokens[i]} but the slices store {gene_ids[i]}: "
                              "the data "
                              f"was prepared with another vocabulary; prepare it with --vocab {where}")
    return tokens


def prepare_scgpt(preset, path, genes, gene_ids, **kw):
    """prepare_backbone for scGPT: with a checkpoint folder its shape and vocabulary, checked tensor by
    tensor; without one the preset, genes keeping the slices' ids (0..G-1 and <cls> at G + 1 without a vocabulary,
    as scGPT appends <pad>, <cls>, <eoc> after the genes)."""
    if path is None:
        gene_ids = np.asarray(gene_ids, dtype=np.int64)
        if not gene_ids.any():                           # scGPT ids start at 0, so [0] (one gene) reads the same
            G = len(gene_ids)
            return Backbone(M.make_config(preset, vocab=G + 3, cls_token=G + 1, **kw), np.arange(G), None)
        cfg = M.make_config(preset, **kw)
        if gene_ids.max() >= cfg.vocab or cfg.cls_token in gene_ids:
            raise CheckpointError(f"the slices' gene ids (up to {gene_ids.max()}) do not fit --preset {preset} "
                                  f"({cfg.vocab} rows, <cls> at {cfg.cls_token}); prepare the data with scGPT's "
                                  "vocab.json")
        return Backbone(cfg, gene_ids, None)
    ck = read_checkpoint(path)
    cfg = M.make_config(preset, **ck.shape, **kw)
    tokens = checkpoint_tokens(ck, genes, gene_ids)
    check_tensors(ck, cfg, tokens)
    return Backbone(cfg, tokens, ck.state)


def check_writable(folder):
    """A checkpoint folder may replace nothing but a previous one (its files only)."""
    if os.path.exists(folder) and not (os.path.isdir(folder) and set(os.listdir(folder)) <= set(FILES)):
        raise CheckpointError(f"{folder} exists and is not an scGPT checkpoint folder; choose another --out")


def write_checkpoint(folder, net, genes, extra):
    """A backbone in the official layout (best_model.pt with torch's names, args.json, vocab.json with the
    genes and <cls>), so that train.py reads pretrain.py's backbones as it reads scGPT's own. Written to a
    temporary folder and renamed; a previous checkpoint folder in its place is replaced."""
    cfg = net.cfg
    args = {"embsize": cfg.dim, "nheads": cfg.heads, "d_hid": cfg.ffn, "nlayers": cfg.layers, "dropout": cfg.dropout,
            "input_emb_style": "category" if cfg.values == "category" else "continuous",
            # our raw values are log2(count + 1), not scGPT's log1p: named for what they are, read back as raw
            "input_style": "log2p" if cfg.values == "raw" else "binned", "n_bins": cfg.n_bins, "pad_token": "<pad>",
            "pad_value": cfg.pad_value, "mask_value": -1, "fast_transformer": False, **extra}
    vocab = {**{g: int(t) for g, t in zip(genes, net.gene_ids.tolist())}, "<cls>": cfg.cls_token}
    check_writable(folder)
    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(tmp)
    try:
        torch.save({k: v.detach().cpu().contiguous() for k, v in net.backbone_state_dict().items()},
                   os.path.join(tmp, "best_model.pt"))
        for name, obj in (("args.json", args), ("vocab.json", vocab)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=1)
        if os.path.isdir(folder):                        # only the files a checkpoint holds, checked above
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            for name in os.listdir(tmp):
                os.remove(os.path.join(tmp, name))
            os.rmdir(tmp)


#################################################################################
#                                    Backbones                                  #
#################################################################################

class Backbone(NamedTuple):
    cfg: M.Config
    tokens: np.ndarray             # token id of each selected gene
    weights: dict                  # backbone tensors by our names; None: random weights


def gene_tokens(gene_ids, vocab):
    """CellFM token ids of the selected genes and the vocabulary size they index. Without a
    vocabulary (ids all 0) genes get their own ids 1..G, so the model can still tell them apart."""
    gene_ids = np.asarray(gene_ids)
    if (gene_ids == 0).all():
        return np.arange(1, len(gene_ids) + 1), len(gene_ids)
    return gene_ids, vocab


def resolve_backbone(spec):
    """--backbone-ckpt -> a local path. Through the Hugging Face cache only with the explicit prefix:
    hf-hub:<owner>/<name> is an scGPT folder (its three files), hf-hub:<owner>/<name>/<file> one CellFM file."""
    if not spec or not spec.startswith(HUB_PREFIX):
        return spec
    parts = spec[len(HUB_PREFIX):].split("/", 2)
    repo = HUB_PREFIX + "/".join(parts[:2])
    if len(parts) == 3:
        return resolve_weights(repo, parts[2])
    return os.path.dirname([resolve_weights(repo, f) for f in FILES][0])  # one snapshot: all three


def prepare_backbone(preset, ckpt, genes, gene_ids, **kw):
    """Config, gene token ids and weights of a backbone: `ckpt` a CellFM file (the preset sets the shape) or an
    official scGPT folder (its tensors and args.json set the shape; preset None picks scgpt), either by path or
    by hf-hub: id; None = random weights. `genes` are the selected symbols, `gene_ids` the ids the slices store;
    kw the remaining Config fields."""
    ckpt = resolve_backbone(ckpt)
    if preset is None:
        preset = "scgpt" if ckpt and os.path.isdir(ckpt) else "small"
    if M.make_config(preset).backbone == "scgpt":
        return prepare_scgpt(preset, ckpt, genes, gene_ids, **kw)
    if ckpt and os.path.isdir(ckpt):
        raise CheckpointError(f"{ckpt} is a folder (an scGPT checkpoint?) but --preset {preset} is a CellFM backbone; "
                              "pass --preset scgpt, or leave --preset out")
    tokens, vocab = gene_tokens(gene_ids, M.make_config(preset).vocab)
    return Backbone(M.make_config(preset, vocab=vocab, **kw), tokens, load_cellfm(ckpt) if ckpt else None)


#################################################################################
#                                    Run files                                  #
#################################################################################

# What a run holds beside its weights: every writer goes through save_run and every reader through load_run
RUN_DEFAULTS = {"val_features": None, "val_expr": None, "test_slice": None, "train_slices": [], "objective": "masked",
                "schedule": "poly-auto", "fill": "gauss", "T": 50, "variant": "hinge", "backbone_ckpt": None,
                "pixel_size_um": None, "context": None, "spatial": None, "val_space": None, "args": {}}


TRAINING_STATE = ("opt", "sched", "state", "rng", "epoch", "imported_from")  # train.py's state, an import's origin


def build_model(cfg, gene_ids):
    """The model a config describes: HINGE on CellFM (model.Hinge) or on scGPT (scgpt.ScGPT), the same interface."""
    return ScGPT(cfg, gene_ids) if cfg.backbone == "scgpt" else M.Hinge(cfg, gene_ids)


def save_run(path, net, genes, features, feat_mean, feat_std, **meta):
    """Write a run: config, weights, genes, features and their standardisation, and RUN_DEFAULTS' keys."""
    if unknown := set(meta) - set(RUN_DEFAULTS) - set(TRAINING_STATE):
        raise ValueError(f"save_run: unknown run keys {sorted(unknown)}")
    run = {"config": asdict(net.cfg), "gene_tokens": net.gene_ids.tolist(), "genes": list(genes),
           "features": list(features), "feat_mean": np.asarray(feat_mean, np.float32),
           "feat_std": np.asarray(feat_std, np.float32), **RUN_DEFAULTS, **meta, "model": net.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(run, tmp)


def read_run(path):
    """A run file as a dict, migrated to the current format."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found; train first (train.py --out {os.path.dirname(path) or '.'})")
    run = torch.load(path, map_location="cpu", weights_only=False)
    cfg = run["config"]
    cfg.setdefault("gate", "residual")                   # runs saved before these choices existed used 1 + g ...
    cfg.setdefault("init", "cellfm")                     # ... and CellFM's initialisation
    if "cellfm_ckpt" in run:                             # the backbone flag's old name
        run["backbone_ckpt"] = run.pop("cellfm_ckpt")
    return {**RUN_DEFAULTS, **run}


def validation_space(run, device="cpu"):
    """The validation spots a spatial run keeps with their neighbours (train.py --spatial) -> (model.SpotSpace,
    scored: their rows, in the order of run['val_expr'])."""
    v = run["val_space"]
    space = SlideSpace(v["features"].astype(np.float32), Neighbours(v["idx"], v["offset"], v["weight"], v["count"]),
                       v["means"], v["slide"])
    return M.SpotSpace.of(space, run["feat_mean"], run["feat_std"], device), v["scored"]


def load_run(path, device="cpu"):
    """A run file -> (model in eval mode on `device`, its diffusion, the run dict)."""
    run = read_run(path)
    cfg = M.Config(**run["config"])
    net = build_model(cfg, run["gene_tokens"])
    net.load_state_dict(run["model"])
    net.to(device).eval()
    return net, make_diffusion(run["objective"], cfg.n_genes, run["T"], run["schedule"], run["fill"]), run


