"""Checkpoints of the official HINGE code: a tiny checkpoint in its format and names, written here with
random values for every tensor, imports into a run whose forward equals the official formulas computed
directly on the official tensors; sample.py and evaluate.py use the run as they are."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import checkpoints as C
import model as M
from conftest import assert_user_error, run_script

D, LAYERS, G, HIST, RANK = 64, 4, 12, 74, 2        # width 64 -> 2 heads of 32, as CellFM's 1536 -> 48


def official_state(G=G, hist=HIST, rows=40, lora=RANK, seed=0):
    """Every tensor of an official HingeModel (models.py, retentionlayer.py), by its official name, random."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"gg": torch.randperm(rows - 1, generator=g)[:G] + 1, "gene_emb": r(rows, D), "cls_token": r(1, 1, D),
          "zero_emb": r(1, 1, D), "value_enc.value_enc.w1.weight": r(256, 1, s=1.0),
          "value_enc.value_enc.w3.weight": r(256, 256, s=0.1), "value_enc.value_enc.table.weight": r(D, 256),
          "value_enc.value_enc.a": r(1, 1)}
    for part, d_in in (("time", 256), ("label", hist), ("mask", G)):
        sd.update({f"cond_embed.{part}.0.weight": r(D, d_in, s=0.1), f"cond_embed.{part}.0.bias": r(D),
                   f"cond_embed.{part}.2.weight": r(D, D, s=0.1), f"cond_embed.{part}.2.bias": r(D)})
    for i in range(LAYERS):
        p = f"retentionblocks.{i}."
        sd.update({p + "adaln.proj.weight": r(6 * D, D, s=0.05), p + "adaln.proj.bias": r(6 * D),
                   p + "pre_norm1._lambda_bias": r(()), p + "pre_norm2._lambda_bias": r(()),
                   p + "post_norm1.weight": 1 + r(D), p + "post_norm1.bias": r(D),
                   p + "post_norm2.weight": 1 + r(D), p + "post_norm2.bias": r(D)})
        for m in ("q", "k", "v", "u", "o"):
            sd[p + f"attn.{m}_proj.weight"] = r(D, D, s=D ** -0.5)
        for m in ("u", "v", "o"):
            sd[p + f"ffn.{m}_proj.weight"] = r(D, D, s=D ** -0.5)
        if lora:
            for m in ("attn.lora_q", "attn.lora_k", "attn.lora_v", "attn.lora_u", "attn.lora_o",
                      "ffn.lora_u", "ffn.lora_v", "ffn.lora_o"):
                sd[p + m + ".A.weight"], sd[p + m + ".B.weight"] = r(lora, D), r(D, lora)
    sd.update({"final_layer.pre_norm._lambda_bias": r(()), "final_layer.w1.weight": r(D, D, s=D ** -0.5),
               "final_layer.w2.weight": r(1, D, s=D ** -0.5), "final_layer.proj.weight": r(2 * D, D, s=0.05),
               "final_layer.proj.bias": r(2 * D)})
    return sd


def official_forward(sd, x, t, mp, mt, y, heads=2):
    """HingeModel.forward(x, t, mp, mt, y) of the official code, use_sigmoid=True, eval mode, written out."""
    def lin(v, name):
        return F.linear(v, sd[name + ".weight"], sd.get(name + ".bias"))

    def lora(v, name):                                   # LoraBlock: B(A(v)) / r
        return (lin(lin(v, name + ".A"), name + ".B") / sd[name + ".A.weight"].shape[0] if name + ".A.weight" in sd
                else 0)

    def soft_pre_norm(v, name):
        lam = torch.sigmoid(sd[name + "._lambda_bias"])
        return (1 - lam) * v + lam * F.layer_norm(v, (D,), eps=1e-6)

    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    temb = torch.cat([torch.cos(t[:, None].float() * freqs), torch.sin(t[:, None].float() * freqs)], -1)
    c = sum(lin(F.silu(lin(v, f"cond_embed.{n}.0")), f"cond_embed.{n}.2")
            for n, v in (("time", temb), ("label", y), ("mask", mp)))
    v = F.leaky_relu(x[..., None] @ sd["value_enc.value_enc.w1.weight"].T)
    v = v @ sd["value_enc.value_enc.w3.weight"].T + v * sd["value_enc.value_enc.a"]
    tok = torch.softmax(v, -1) @ sd["value_enc.value_enc.table.weight"].T
    tok = tok + sd["zero_emb"] * (1 - mt)[..., None] + sd["gene_emb"][sd["gg"]][None]
    B = x.shape[0]
    h = torch.cat([sd["cls_token"].expand(B, 1, D), tok], 1)
    am = torch.cat([torch.ones(B, 1), mt], 1)[:, None, :, None]     # (B, 1, L, 1)
    dh, alpha = D // heads, (2 * LAYERS) ** 0.25

    def retention(z, p, masked):
        q, k = lin(z, p + "q_proj") + lora(z, p + "lora_q"), lin(z, p + "k_proj") + lora(z, p + "lora_k")
        vv, u = lin(z, p + "v_proj") + lora(z, p + "lora_v"), lin(z, p + "u_proj") + lora(z, p + "lora_u")
        split = lambda a: a.view(B, -1, heads, dh).transpose(1, 2)  # noqa: E731
        Q, K, V, U = F.relu(split(q)) / math.sqrt(dh), F.relu(split(k)) / math.sqrt(dh), split(vv), F.silu(split(u))
        V = V * torch.rsqrt(torch.tensor(float(G)) + 1e-6)
        if masked:
            K, V = K * am, V * am
        O = Q @ (K.transpose(-1, -2) @ V)
        O = O / torch.clamp(O.norm(dim=-1, keepdim=True) / math.sqrt(dh), min=1e-12) * U
        O = O.transpose(1, 2).reshape(B, -1, D)
        return lin(O, p + "o_proj") + lora(O, p + "lora_o")

    def glu(z, p):
        u, v = lin(z, p + "u_proj") + lora(z, p + "lora_u"), lin(z, p + "v_proj") + lora(z, p + "lora_v")
        return lin(u * v, p + "o_proj") + lora(u * v, p + "lora_o")

    for i in range(LAYERS):
        p = f"retentionblocks.{i}."
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = (s[:, None] for s in lin(F.silu(c), p + "adaln.proj").split(D, -1))
        a = retention(sh_a + soft_pre_norm(h, p + "pre_norm1") * (sc_a + 1), p + "attn.", i < LAYERS // 2)
        h = F.layer_norm(a * torch.sigmoid(g_a) + alpha * h, (D,), sd[p + "post_norm1.weight"],
                         sd[p + "post_norm1.bias"], 1e-6)
        f = glu(sh_f + soft_pre_norm(h, p + "pre_norm2") * (sc_f + 1), p + "ffn.")
        h = F.layer_norm(f * torch.sigmoid(g_f) + alpha * h, (D,), sd[p + "post_norm2.weight"],
                         sd[p + "post_norm2.bias"], 1e-6)
    sh, sc = (s[:, None] for s in lin(F.silu(c), "final_layer.proj").split(D, -1))
    z = sh + soft_pre_norm(h[:, 1:], "final_layer.pre_norm") * (sc + 1)
    return lin(F.leaky_relu(lin(z, "final_layer.w1")), "final_layer.w2").squeeze(-1)


def batch(B=6, G=G, hist=HIST, seed=3):
    g = torch.Generator().manual_seed(seed)
    mt = (torch.rand(B, G, generator=g) > 0.5).float()
    mp = torch.maximum(mt, (torch.rand(B, G, generator=g) > 0.5).float())   # m_{t-1} ⊇ m_t
    x = torch.where(mt.bool(), torch.rand(B, G, generator=g) * 5, torch.randn(B, G, generator=g))
    return x, torch.randint(1, 50, (B,), generator=g), mp, mt, torch.randn(B, hist, generator=g)


def write_official(tmp_path, sd, genes):
    """best_weight.pt as the official Trainer saves it, the gene list, and a vocabulary whose rows give gg."""
    torch.save({"model": sd, "opt": {}, "epoch": 17}, tmp_path / "best_weight.pt")
    (tmp_path / "genes.txt").write_text("".join(g + "\n" for g in genes))
    vocab = [f"FILLER{i}" for i in range(len(sd["gene_emb"]) - 1)]
    for gene, tok in zip(genes, sd["gg"].tolist()):
        vocab[tok - 1] = gene
    pd.DataFrame({"HGNC_gene": vocab}).to_csv(tmp_path / "gene_info.csv", index=False)


def import_args(tmp_path, *extra):
    return ("--import-hinge", tmp_path / "best_weight.pt", "--genes", tmp_path / "genes.txt",
            "--vocab", tmp_path / "gene_info.csv", "--out", tmp_path / "run" / "best.pt", *extra)


def test_imported_model_computes_the_official_formulas(tmp_path):
    sd = official_state()
    write_official(tmp_path, sd, [f"GENE{i}" for i in range(G)])
    run_script("convert.py", *import_args(tmp_path, "--features", "stain"))
    net, diffusion, ck = C.load_run(tmp_path / "run" / "best.pt", "cpu")
    cfg = net.cfg
    assert (cfg.layers, cfg.dim, cfg.heads, cfg.vocab, cfg.n_genes, cfg.hist_dim, cfg.lora_rank, cfg.gate) == \
        (LAYERS, D, 2, 39, G, HIST, RANK, "sigmoid")
    assert ck["gene_tokens"] == sd["gg"].tolist() and ck["test_slice"] is None and ck["epoch"] == 17
    assert (ck["feat_mean"] == 0).all() and (ck["feat_std"] == 1).all() and ck["T"] == 50
    x, t, mp, mt, y = batch()
    with torch.no_grad():
        ours = net(x, mt.bool(), t, mp.bool(), net.embed_histology(y))
        ref = official_forward(sd, x, t, mp, mt, y)
    assert ours.shape == (6, G)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5), (ours - ref).abs().max()
    sd2 = {k: v.clone() for k, v in sd.items()}                     # every official tensor matters
    sd2["retentionblocks.1.attn.lora_v.B.weight"] += 0.5
    assert not torch.allclose(official_forward(sd2, x, t, mp, mt, y), ref, atol=1e-4)


def test_residual_gate_imports_use_sigmoid_false(tmp_path):
    """The official use_sigmoid=False gates with g itself; ours is 1 + g: the import shifts the bias by one."""
    sd = official_state(lora=0)
    write_official(tmp_path, sd, [f"GENE{i}" for i in range(G)])
    run_script("convert.py", *import_args(tmp_path, "--features", "stain", "--gate", "residual"))
    net, _, _ = C.load_run(tmp_path / "run" / "best.pt", "cpu")
    c = torch.randn(3, D)
    blk = net.encoder[2]
    ga = blk.adaln(F.silu(c)).chunk(6, -1)[2]
    off = F.linear(F.silu(c), sd["retentionblocks.2.adaln.proj.weight"],
                   sd["retentionblocks.2.adaln.proj.bias"]).chunk(6, -1)[2]
    assert torch.allclose(M.gate(ga, "residual"), off, atol=1e-6)


@pytest.mark.parametrize("fault, words", [
    ("missing", ["missing tensors", "retentionblocks.2.ffn.u_proj.weight"]),
    ("unexpected", ["unexpected tensors", "retentionblocks.0.extra.weight"]),
    ("mis-shaped", ["mis-shaped tensors", "final_layer.w1.weight"]),
    ("gene order", ["GENE1", "gg"]),
    ("not a checkpoint", ["not an official HINGE checkpoint"]),
])
def test_bad_official_checkpoints_are_refused_by_name(tmp_path, fault, words):
    sd = official_state()
    genes = [f"GENE{i}" for i in range(G)]
    write_official(tmp_path, sd, genes)
    if fault == "missing":
        del sd["retentionblocks.2.ffn.u_proj.weight"]
    elif fault == "unexpected":
        sd["retentionblocks.0.extra.weight"] = torch.zeros(3)
    elif fault == "mis-shaped":
        sd["final_layer.w1.weight"] = torch.zeros(D, D + 1)
    elif fault == "gene order":
        (tmp_path / "genes.txt").write_text("".join(g + "\n" for g in genes[1:] + genes[:1]))
    else:
        sd = {"weights": torch.zeros(3)}
    torch.save({"model": sd, "opt": {}, "epoch": 1}, tmp_path / "best_weight.pt")
    assert_user_error(run_script("convert.py", *import_args(tmp_path), check=False), *words)
    assert not (tmp_path / "run").exists()


def test_imported_run_samples_and_evaluates_the_demo(tmp_path):
    """Data prepared with the checkpoint's gene list, in its order, are sampled and scored as they are."""
    run_script("prepare_data.py", "--out", tmp_path / "selected")
    genes = (tmp_path / "selected" / "genes.txt").read_text().split()[::-1][:40]   # another order than ours
    sd = official_state(G=len(genes), rows=48, lora=0)           # rows: a multiple of 8, as the official code builds
    write_official(tmp_path, sd, genes)
    run_script("prepare_data.py", "--out", tmp_path / "data", "--genes", tmp_path / "genes.txt")
    assert (tmp_path / "data" / "genes.txt").read_text().split() == genes
    run_script("extract_features.py", "--data", tmp_path / "data", "--encoder", "stain")
    run_script("convert.py", *import_args(tmp_path, "--features", "stain"))
    p = run_script("sample.py", "--run", tmp_path / "run", "--data", tmp_path / "data", check=False)
    assert_user_error(p, "--slices")
    run_script("sample.py", "--run", tmp_path / "run", "--data", tmp_path / "data", "--slices", "demo1,demo3",
               "--steps", "2", "--samples", "2", "--out", tmp_path / "pred")
    run_script("evaluate.py", "--pred", tmp_path / "pred", "--data", tmp_path / "data", "--out", tmp_path / "eval")
    m = pd.read_csv(tmp_path / "eval" / "metrics.csv").set_index("slice")
    assert {"demo1", "demo3"} <= set(m.index) and np.isfinite(m.loc[["demo1", "demo3"], "MSE"]).all()


def test_prepare_with_a_gene_list_missing_from_the_data(tmp_path):
    (tmp_path / "genes.txt").write_text("NOT_A_GENE\n")
    p = run_script("prepare_data.py", "--out", tmp_path / "data", "--genes", tmp_path / "genes.txt", check=False)
    assert_user_error(p, "NOT_A_GENE", "not measured")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.h5"))
