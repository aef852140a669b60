"""scgpt.py: HINGE on an scGPT backbone. The official checkpoint folder read by key name, identity at init
against torch's own TransformerEncoderLayer, scGPT's generative attention for hidden genes, per-spot
binning, and pretrain.py -> train.py -> sample.py with an scGPT backbone; every bad checkpoint named."""
import json
import math
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints as C
import model as M
import scgpt
from conftest import assert_user_error, lay_out_hub_cache, make_her2st, run_script
from common import decode

D, HEADS, FFN, LAYERS, NB = 32, 4, 48, 2, 51             # FFN != D so that a transposed feed-forward shows


class Reference(nn.Module):
    """scGPT as its non-flash path builds it, from torch modules, under the names of its best_model.pt."""
    def __init__(self, rows, category=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.ModuleDict({"embedding": nn.Embedding(rows, D), "enc_norm": nn.LayerNorm(D)})
        self.value_encoder = nn.ModuleDict(
            {"embedding": nn.Embedding(NB + 2, D), "enc_norm": nn.LayerNorm(D)} if category else
            {"linear1": nn.Linear(1, D), "linear2": nn.Linear(D, D), "norm": nn.LayerNorm(D)})
        self.flag_encoder = nn.Embedding(2, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True)  # post-norm, ReLU
        self.transformer_encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.decoder = nn.ModuleDict({"fc": nn.Sequential(nn.Linear(D, D), nn.LeakyReLU(), nn.Linear(D, D),
                                                          nn.LeakyReLU(), nn.Linear(D, 1))})
        with torch.no_grad():                            # no tensor at its default 0 or 1, so that a mix-up shows
            for k, p in self.named_parameters():
                if k.endswith("bias") or "norm" in k:
                    p.add_(torch.randn_like(p) * 0.3)
        self.eval()

    def values(self, v):                                 # v [B, L] -> [B, L, D]
        e = self.value_encoder
        if "embedding" in e:
            return e["enc_norm"](e["embedding"](v.long()))
        return e["norm"](e["linear2"](F.relu(e["linear1"](v.unsqueeze(-1)))))

    def tokens(self, ids):
        return self.encoder["enc_norm"](self.encoder["embedding"](ids))

    def forward(self, ids, v):                           # ids, v [B, L] with <cls> first -> [B, L]
        return self.decoder["fc"](self.transformer_encoder(self.tokens(ids) + self.values(v))).squeeze(-1)


def vocab_of(genes):
    """vocab.json as scGPT's pre-training writes it: the genes from 0, then <pad>, <cls>, <eoc>."""
    n = len(genes)
    return {**{g: i for i, g in enumerate(genes)}, "<pad>": n, "<cls>": n + 1, "<eoc>": n + 2}


def write_official(folder, ref, genes, style="log1p", names="flash", args=None):
    """best_model.pt, args.json, vocab.json as the official scGPT code writes them (flash-attention names
    Wqkv; `impl`: its newer wrapper's `_impl.` and DDP's `module.`), with the MVC head HINGE ignores."""
    os.makedirs(folder, exist_ok=True)
    sd = {}
    for k, v in ref.state_dict().items():
        if names != "torch":
            k = (k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight")
                 .replace("self_attn.in_proj_bias", "self_attn.Wqkv.bias"))
        if names == "impl":
            k = "module." + k.replace("self_attn.", "self_attn._impl.")
        sd[k] = v.clone()
    sd["mvc_decoder.gene2query.weight"], sd["mvc_decoder.W.weight"] = torch.randn(D, D), torch.randn(D, D)
    torch.save(sd, os.path.join(folder, "best_model.pt"))
    category = style == "category"
    a = {"embsize": D, "nheads": HEADS, "d_hid": FFN, "nlayers": LAYERS, "dropout": 0.2, "n_bins": NB,
         "input_emb_style": "category" if category else "continuous",
         "input_style": "log1p" if style == "log1p" else "binned",
         "pad_token": "<pad>", "pad_value": NB if category else -2, "mask_value": NB + 1 if category else -1,
         "fast_transformer": True, **(args or {})}
    json.dump(a, open(os.path.join(folder, "args.json"), "w"))
    json.dump(vocab_of(genes), open(os.path.join(folder, "vocab.json"), "w"))
    return sd


def np_bins(x, n_bins=NB):
    """scGPT's preprocessing of one cell, in numpy: non-zero values digitised by their quantiles, zeros 0."""
    out, nz = np.zeros_like(x), x > 0
    if nz.any():
        out[nz] = np.digitize(x[nz], np.quantile(x[nz], np.linspace(0, 1, n_bins - 1)))
    return out


GENES = [f"G{i}" for i in range(40)]
SEL = GENES[3:27]                                        # the 24 selected genes: rows 3..26
G = len(SEL)


def load(folder, gene_ids=None, **kw):
    cfg, tokens, weights = C.prepare_backbone(None, str(folder), SEL, np.zeros(G) if gene_ids is None else gene_ids,
                                              n_genes=G, hist_dim=16, **kw)
    net = C.build_model(cfg, tokens)
    C.load_backbone(net, weights, str(folder))
    return net.eval()


def spots(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.log2(1 + torch.poisson(torch.rand(B, G, generator=g) * 6, generator=g))  # log2(count + 1), zeros included
    return x, torch.randint(1, 50, (B,), generator=g), torch.randn(B, 16, generator=g)


# ----------------------------------------------------------------------------- the checkpoint folder

@pytest.mark.parametrize("style, names", [("log1p", "flash"), ("binned", "torch"), ("category", "impl")])
def test_identity_at_init_equals_torch_transformer(tmp_path, style, names):
    """All genes visible, untrained conditioning (residual gate): the model is the torch-built scGPT up to
    SoftNorm's λ = sigmoid(-12) ≈ 6e-6; the bare backbone equals it to round-off."""
    ref = Reference(len(GENES) + 3, category=style == "category")
    write_official(tmp_path, ref, GENES, style, names)
    net = load(tmp_path, gate="residual")
    assert (net.cfg.dim, net.cfg.layers, net.cfg.heads, net.cfg.ffn, net.cfg.vocab, net.cfg.cls_token) == \
        (D, LAYERS, HEADS, FFN, 43, 41)
    assert net.cfg.values == {"log1p": "raw", "binned": "binned", "category": "category"}[style]
    x, t, hist = spots()
    vis = torch.ones_like(x, dtype=torch.bool)
    values = x if style == "log1p" else torch.from_numpy(np.stack([np_bins(r) for r in x.numpy()]))
    pad = NB if style == "category" else -2
    ids = torch.cat([torch.full((len(x), 1), 41), torch.arange(3, 27).expand(len(x), -1)], 1)
    with torch.no_grad():
        expect = ref(ids, torch.cat([torch.full((len(x), 1), float(pad)), values], 1))[:, 1:]
        bare = net(x, vis)
        outs = [net(x, vis, t, vis, net.embed_histology(hist * s)) for s in (1, 3)]
    assert (bare - expect).abs().max() < 1e-5, (bare - expect).abs().max()
    assert torch.allclose(outs[0], outs[1], atol=1e-6)  # the histology does not matter yet
    assert ((outs[0] - expect).norm() / expect.norm()).item() < 1e-4
    assert expect.std() > 0.02                          # a real output, not a constant


def test_hidden_genes_follow_scgpts_generative_attention(tmp_path):
    """Hidden genes enter as gene + flag (no value), attend to <cls>, the known genes and themselves, and skip
    out_proj (scGPT's FlashscGPTMHA); known genes never see them. Reference: scGPT's two streams, written out."""
    ref = Reference(len(GENES) + 3)
    write_official(tmp_path, ref, GENES)
    net = load(tmp_path)
    x, _, _ = spots(B=3)
    vis = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    vis[2] = False                                       # the first sampling step: nothing known yet
    dh = D // HEADS

    def split(z):
        return z.view(1, -1, HEADS, dh).transpose(1, 2)  # [1, h, n, dh]

    def merge(z):
        return z.transpose(1, 2).reshape(1, -1, D)

    def two_streams(xs, vs):
        ids = torch.cat([torch.tensor([41]), torch.arange(3, 27)])
        known = torch.cat([torch.tensor([True]), vs])
        tok = ref.tokens(ids)
        p = (tok + ref.values(torch.cat([torch.tensor([-2.0]), xs])))[known][None]   # [1, P, D]
        g = (tok + ref.flag_encoder.weight[1])[~known][None]                         # [1, Q, D]
        for layer in ref.transformer_encoder.layers:
            W, b, proj = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias, layer.self_attn.out_proj
            qp, kp, vp = map(split, F.linear(p, W, b).chunk(3, -1))
            qg, kg, vg = map(split, F.linear(g, W, b).chunk(3, -1))
            op = F.scaled_dot_product_attention(qp, kp, vp)
            logits = torch.cat([qg @ kp.transpose(-1, -2), (qg * kg).sum(-1, keepdim=True)], -1) / math.sqrt(dh)
            w = logits.softmax(-1)
            og = w[..., :-1] @ vp + w[..., -1:] * vg
            ffn = lambda z: layer.linear2(F.relu(layer.linear1(z)))  # noqa: E731
            p = layer.norm1(p + proj(merge(op)))
            g = layer.norm1(g + merge(og))
            p, g = layer.norm2(p + ffn(p)), layer.norm2(g + ffn(g))
        out = torch.empty(G + 1)
        out[known], out[~known] = ref.decoder["fc"](p)[0, :, 0], ref.decoder["fc"](g)[0, :, 0]
        return out[1:]

    with torch.no_grad():
        got = net(x, vis)
        refilled = net(torch.where(vis, x, torch.randn_like(x) * 5), vis)
        for i in range(len(x)):
            assert torch.allclose(got[i], two_streams(x[i], vis[i]), atol=1e-5), i
    assert torch.equal(got, refilled)                    # a hidden gene's filled value is never read


def test_folder_loads_bit_exact_and_ignores_only_the_named_heads(tmp_path):
    ref = Reference(len(GENES) + 3)
    sd = write_official(tmp_path, ref, GENES)
    net = load(tmp_path)
    own = net.state_dict()
    assert net.cfg.dropout == 0.2 and net.cfg.pad_value == -2
    for k, v in sd.items():
        if k.startswith("mvc_decoder."):
            continue
        assert torch.equal(own[C.our_name(k)], v), k
    assert set(net.backbone_state_dict()) == {C.our_name(k) for k in sd if not k.startswith("mvc_decoder.")}


def test_bad_tensors_and_vocabularies_are_named(tmp_path):
    ref = Reference(len(GENES) + 3)
    sd = write_official(tmp_path, ref, GENES)
    pt = tmp_path / "best_model.pt"
    for change, words in [(lambda s: s.pop("decoder.fc.4.bias"), "missing tensors: decoder.fc.4.bias"),
                          (lambda s: s.update({"batch_encoder.embedding.weight": torch.zeros(3, D)}),
                           "unexpected tensors: batch_encoder.embedding.weight"),
                          (lambda s: s.update({"transformer_encoder.layers.1.linear2.weight": torch.zeros(D, FFN + 1)}),
                           "mis-shaped tensors: transformer_encoder.layers.1.linear2.weight (32, 49) "
                           "(expected (32, 48))")]:
        bad = dict(sd)
        change(bad)
        torch.save(bad, pt)
        with pytest.raises(C.CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load(tmp_path)
    torch.save(sd, pt)
    with pytest.raises(C.CheckpointError, match="1 of the 24 selected genes are not in it .G3."):
        C.prepare_backbone(None, str(tmp_path), ["G3x"] + SEL[1:], np.zeros(G), n_genes=G, hist_dim=16)
    with pytest.raises(C.CheckpointError, match="gives G3 the id 3 but the slices store 1"):
        load(tmp_path, gene_ids=np.arange(1, G + 1))     # prepared with CellFM's ids (row + 1)
    load(tmp_path, gene_ids=np.arange(3, 27))            # prepared with this vocab.json: accepted
    with pytest.raises(C.CheckpointError, match="is a CellFM backbone"):
        C.prepare_backbone("small", str(tmp_path), SEL, np.zeros(G), n_genes=G)
    json.dump({"nheads": 5}, open(tmp_path / "args.json", "w"))
    with pytest.raises(C.CheckpointError, match="nheads 5 does not divide the width 32"):
        load(tmp_path)


def test_bins_match_scgpts_preprocessing_over_visible_genes():
    g = torch.Generator().manual_seed(3)
    x = torch.log2(1 + torch.poisson(torch.rand(6, 300, generator=g) * 20, generator=g))
    vis = torch.rand(6, 300, generator=g) > 0.3
    vis[4] = False                                       # nothing visible
    vis[5] = False
    vis[5, 7], x[5, 7] = True, 2.0                       # one visible value
    got = scgpt.bin_values(x, vis, NB).numpy()
    expect = np.stack([np_bins(np.where(v, r, 0)) for r, v in zip(x.numpy(), vis.numpy())])
    assert np.array_equal(got, expect)
    assert got.max() == NB - 1 and got[5, 7] == NB - 1 and got[4].max() == 0


def test_lora_and_variants_on_scgpt(tmp_path):
    cfg = M.make_config("scgpt-tiny", n_genes=G, hist_dim=16, vocab=G + 3, cls_token=G + 1, lora_rank=4, init="cellfm")
    net = C.build_model(cfg, np.arange(G))
    x, t, hist = spots()
    vis = torch.ones_like(x, dtype=torch.bool)
    bare = net.eval()(x, vis)
    with torch.no_grad():                                # B = 0 at init (cellfm init): LoRA changes nothing
        blk = net.transformer_encoder["layers"][0]
        assert (blk.self_attn.in_proj_lora_B == 0).all() and (blk.linear1.lora_B == 0).all()
        blk.self_attn.in_proj_lora_B.normal_()
        assert not torch.allclose(net(x, vis), bare)     # and the in_proj update reaches the output
    M.set_trainable(net, "backbone-lora")
    train = {k for k, p in net.named_parameters() if p.requires_grad}
    assert {"transformer_encoder.layers.0.self_attn.in_proj_lora_A",
            "transformer_encoder.layers.1.linear2.lora_B"} <= train
    assert not any(M.is_backbone_key(k) for k in train)
    M.set_trainable(net, "decoder-tune")
    train = {k for k, p in net.named_parameters() if p.requires_grad}
    assert "decoder.fc.4.weight" in train and "transformer_encoder.layers.0.linear1.weight" not in train


# ----------------------------------------------------------------------------- the stage scripts

@pytest.fixture(scope="module")
def demo_genes(demo):
    with h5py.File(demo / "data" / "slices" / "demo1.h5", "r") as f:
        return decode(f["genes"])


@pytest.fixture(scope="module")
def official(demo, demo_genes):
    """A random scGPT in the official layout whose vocabulary holds the demo's genes among others."""
    folder = demo / "scgpt_official"
    genes = [f"X{i}" for i in range(5)] + demo_genes + ["Y0"]
    write_official(folder, Reference(len(genes) + 3), genes, "binned")
    return folder


@pytest.fixture(scope="module")
def scgpt_backbone(demo):
    out = demo / "scgpt_backbone"
    run_script("pretrain.py", "--data", demo / "data", "--exclude", "demo1", "--preset", "scgpt-tiny",
               "--epochs", "4", "--lr", "3e-3", "--out", out)
    return out


def train_scgpt(demo, out, *extra, check=True):
    return run_script("train.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1",
                      "--out", out, "--lr", "3e-3", *extra, check=check)


def test_pretrain_writes_the_official_layout(scgpt_backbone, demo_genes):
    assert sorted(os.listdir(scgpt_backbone)) == ["args.json", "best_model.pt", "vocab.json"]
    args = json.load(open(scgpt_backbone / "args.json"))
    meta = args["pretrain"]
    assert float(meta["val_mse_after"]) < 0.8 * float(meta["val_mse_before"]) and "demo1" not in meta["slices"]
    assert (args["embsize"], args["nlayers"], args["input_style"]) == (32, 2, "log2p")   # log2(count + 1)
    ck = C.read_checkpoint(str(scgpt_backbone))
    assert ck.vocab == {**{g: i for i, g in enumerate(demo_genes)}, "<cls>": len(demo_genes) + 1}
    assert "flag_encoder.weight" in ck.state and not any(k.startswith(("cond_net", "dec_")) for k in ck.state)


def test_hinge_on_pretrained_scgpt_trains_and_samples(demo, scgpt_backbone, tmp_path):
    """The chain run_all.sh runs with --preset scgpt-tiny: pretrain -> train (frozen backbone) -> sample."""
    run = tmp_path / "run"
    train_scgpt(demo, run, "--preset", "scgpt-tiny", "--backbone-ckpt", scgpt_backbone, "--epochs", "1",
                "--batch-size", "64")
    ck = torch.load(run / "best.pt", weights_only=False)
    assert ck["config"]["backbone"] == "scgpt" and ck["backbone_ckpt"] == str(scgpt_backbone)
    saved = C.read_checkpoint(str(scgpt_backbone)).state
    assert all(torch.equal(ck["model"][k], v) for k, v in saved.items())  # variant hinge: scGPT stayed frozen
    assert not torch.equal(ck["model"]["dec_adaln.weight"], torch.zeros_like(ck["model"]["dec_adaln.weight"]))
    run_script("sample.py", "--run", run, "--data", demo / "data", "--steps", "5", "--samples", "2")
    with h5py.File(run / "pred" / "demo1.h5", "r") as f, h5py.File(demo / "data" / "slices" / "demo1.h5", "r") as s:
        pred, truth = f["pred"][()], s["expr"][()]
        assert pred.shape == truth.shape and np.isfinite(pred).all() and f["std"][()].max() > 0
    assert (run / "pred" / "demo1.h5ad").is_file()


def test_train_reads_an_official_folder_without_a_preset(demo, official, tmp_path):
    p = train_scgpt(demo, tmp_path / "run", "--backbone-ckpt", official, "--epochs", "1", "--batch-size", "64")
    assert "hinge:" in p.stdout
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert (ck["config"]["dim"], ck["config"]["ffn"], ck["config"]["values"]) == (D, FFN, "binned")
    assert ck["gene_tokens"] == list(range(5, 5 + len(ck["genes"])))


def test_backbone_by_hub_id_from_the_cache_offline(demo, official, backbone, tmp_path, monkeypatch):
    """--backbone-ckpt hf-hub:<owner>/<name> is an scGPT folder, hf-hub:<owner>/<name>/<file> a CellFM file,
    read from the Hugging Face cache offline; uncached, a one-line error and nothing written."""
    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "lab/scgpt-demo", {f: official / f for f in C.FILES})
    lay_out_hub_cache(cache, "lab/cellfm-demo", {"weights/backbone.safetensors": backbone})
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")               # for the scripts run below
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: for this process
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    folder = C.resolve_backbone("hf-hub:lab/scgpt-demo")
    assert sorted(os.listdir(folder)) == sorted(C.FILES)
    assert open(C.resolve_backbone("hf-hub:lab/cellfm-demo/weights/backbone.safetensors"), "rb").read() == \
        open(backbone, "rb").read()
    assert C.resolve_backbone(str(backbone)) == str(backbone)   # a path without the prefix is never looked up

    train_scgpt(demo, tmp_path / "run", "--backbone-ckpt", "hf-hub:lab/scgpt-demo", "--epochs", "1",
                "--batch-size", "64")
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ck["backbone_ckpt"] == "hf-hub:lab/scgpt-demo"
    saved = C.read_checkpoint(str(official)).state
    assert all(torch.equal(ck["model"][k], v) for k, v in saved.items() if k in ck["model"])
    p = train_scgpt(demo, tmp_path / "bad", "--backbone-ckpt", "hf-hub:lab/absent", check=False)
    assert_user_error(p, "hf-hub:lab/absent", "is not in the Hugging Face cache", "login")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["best_model.pt", "cannot be read", "truncated"]),
    ("no-vocab", ["no vocab.json"]),
    ("mis-shape", ["mis-shaped tensors: flag_encoder.weight (3, 32) (expected (2, 32))"])])
def test_bad_official_folder_is_one_line_error_and_nothing_written(demo, official, tmp_path, damage, words):
    folder = tmp_path / "ck"
    os.makedirs(folder)
    for name in C.FILES:
        (folder / name).write_bytes((official / name).read_bytes())
    if damage == "truncate":
        data = (folder / "best_model.pt").read_bytes()
        (folder / "best_model.pt").write_bytes(data[:len(data) // 2])
    elif damage == "no-vocab":
        os.remove(folder / "vocab.json")
    else:
        sd = torch.load(folder / "best_model.pt")
        sd["flag_encoder.weight"] = torch.zeros(3, D)
        torch.save(sd, folder / "best_model.pt")
    p = train_scgpt(demo, tmp_path / "run", "--backbone-ckpt", folder, check=False)
    assert_user_error(p, *words)
    assert not (tmp_path / "run").exists()


def test_prepare_data_reads_scgpt_vocab_json(tmp_path):
    """Gene ids = vocab.json's values (from 0); its special tokens are no genes."""
    from common import read_vocab
    raw = make_her2st(tmp_path / "raw")
    genes = [f"G{i:02d}" for i in range(60)]
    vocab = {**{g: i for i, g in enumerate(genes[::-1])}, "<pad>": 60, "<cls>": 61, "<eoc>": 62}
    del vocab["G07"]
    json.dump(vocab, open(tmp_path / "vocab.json", "w"))
    assert set(read_vocab(str(tmp_path / "vocab.json"))) == set(genes) - {"G07"}
    (tmp_path / "genes.txt").write_text("G59\nG03\nG10\n")
    run_script("prepare_data.py", "--dataset", "her2st", "--raw", raw, "--out", tmp_path / "given",
               "--vocab", tmp_path / "vocab.json", "--genes", tmp_path / "genes.txt")
    with h5py.File(tmp_path / "given" / "slices" / "A1.h5", "r") as f:
        assert f["gene_ids"][()].tolist() == [0, 56, 49]
    run_script("prepare_data.py", "--dataset", "her2st", "--raw", raw, "--out", tmp_path / "out", "--n-top", "40",
               "--vocab", tmp_path / "vocab.json")
    with h5py.File(tmp_path / "out" / "slices" / "A1.h5", "r") as f:
        sel, ids = decode(f["genes"]), f["gene_ids"][()].tolist()
    assert sel and "G07" not in sel and ids == [vocab[g] for g in sel]
    json.dump({"G01": "x"}, open(tmp_path / "bad.json", "w"))
    p = run_script("prepare_data.py", "--dataset", "her2st", "--raw", raw, "--out", tmp_path / "out2",
                   "--vocab", tmp_path / "bad.json", check=False)
    assert_user_error(p, "bad.json", "not an scGPT vocab.json")
    assert not (tmp_path / "out2").exists()
