"""Checkpoints made elsewhere, turned into ours (beside checkpoints.py, as DiT's download.py beside its models):
CellFM's released weights into .safetensors, and the official HINGE training code's checkpoints into runs that
sample.py and evaluate.py use as they are (README "Using the authors' checkpoints").

    python convert.py --cellfm base_weight.ckpt cellfm_800m.safetensors
    python convert.py --import-hinge best_weight.pt --genes used_selected_gene_list.txt \
        --vocab gene_info.csv --out runs/official/best.pt
"""
import argparse
import os
import re

import numpy as np
import torch
from safetensors.torch import save_file

import model as M
from checkpoints import CheckpointError, load_cellfm, save_run
from common import UserError, atomic_path, read_gene_list, read_vocab, run


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
    save_run(a.out, net, genes, feats, np.zeros(cfg.hist_dim, np.float32), np.ones(cfg.hist_dim, np.float32),
               T=a.T, imported_from=os.path.abspath(a.import_hinge), epoch=ck.get("epoch"), args=vars(a))
    print(f"wrote {a.out}: {cfg.layers} layers, width {cfg.dim}, {cfg.heads} heads, {cfg.n_genes} genes, "
          f"{cfg.hist_dim}-d features ({a.features}), {cfg.gate} gate"
          + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""))


def main():
    p = argparse.ArgumentParser(description="Checkpoint tools: convert a CellFM checkpoint to .safetensors, or import "
                                            "an official HINGE checkpoint as a run for sample.py.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--cellfm", nargs=2, metavar=("IN", "OUT"), help="CellFM .ckpt/.pt/.bin -> .safetensors")
    g.add_argument("--import-hinge", metavar="PT", help="official HINGE best_weight.pt ({'model', 'opt', 'epoch'})")
    p.add_argument("--genes", help="import: its gene list, one symbol per line in training order "
                                   "(used_selected_gene_list.txt)")
    p.add_argument("--vocab", help="import: CellFM gene_info.csv it was trained with (token id = row + 1)")
    p.add_argument("--out", help="import: the run checkpoint to write, e.g. RUN/best.pt")
    p.add_argument("--heads", type=int, help="import: attention heads (default width / 32, as CellFM)")
    p.add_argument("--gate", choices=["sigmoid", "residual"], default="sigmoid",
                   help="import: the official use_sigmoid=True (default) or use_sigmoid=False")
    p.add_argument("--features", default="uni,conch",
                   help="import: its histology features, in order (default uni,conch)")
    p.add_argument("--T", type=int, default=50, help="import: its --num_timesteps (default 50)")
    a = p.parse_args()
    if a.cellfm:
        return convert(*a.cellfm)
    missing = [f"--{k}" for k in ("genes", "vocab", "out") if not getattr(a, k)]
    if missing:
        raise UserError(f"--import-hinge needs {', '.join(missing)}")
    import_hinge(a)


if __name__ == "__main__":
    run(main)
