"""model.py: CellFM checkpoint loading, identity at init, variants, masked/Gaussian diffusion, sampler."""
import math
import os

import numpy as np
import pytest
import torch

import checkpoints as C
import model as M
from diffusion import GaussianDiffusion, MaskedDiffusion, generate, step_times
from heads import PointHead
from conftest import FIXTURES, run_script

CKPT = os.path.join(FIXTURES, "cellfm_tiny_mindspore.ckpt")
needs_fixture = pytest.mark.skipif(not os.path.isfile(CKPT), reason=f"CellFM fixture not found at {CKPT}")
G = 24


def tiny_model(**kw):
    """CellFM's initialisation and the 1 + g gate unless asked: the untrained model is exactly CellFM."""
    torch.manual_seed(0)
    cfg = M.tiny(n_genes=G, hist_dim=48, **{"gate": "residual", "init": "cellfm", **kw})
    return M.Hinge(cfg, torch.arange(1, G + 1) * 2)     # token ids 2..48 of the 63-gene vocabulary


def batch(B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, G, generator=g) * 6
    vis = torch.rand(B, G, generator=g) > 0.4
    return x, vis, torch.randint(1, 50, (B,), generator=g), torch.randn(B, 48, generator=g)


# ----------------------------------------------------------------------------- checkpoints

@needs_fixture
def test_mindspore_ckpt_equals_npz_tensor_for_tensor():
    sd = C.load_cellfm(CKPT)
    ref = np.load(os.path.join(FIXTURES, "cellfm_tiny_mindspore.npz"))
    names = {k.replace(".gamma", ".weight").replace(".beta", ".bias") for k in ref}
    assert set(sd) == names                              # Adam moments and scalars skipped, nothing else
    for k in ref:
        np.testing.assert_array_equal(sd[k.replace(".gamma", ".weight").replace(".beta", ".bias")].numpy(), ref[k])
    assert sd["value_enc.value_enc.w3.weight"].shape == (256, 256)  # stored in 32 slices


@needs_fixture
def test_fixture_loads_into_tiny_with_no_missing_or_unexpected_keys():
    m = tiny_model()
    unused, unexpected = C.load_backbone(m, C.load_cellfm(CKPT), CKPT)
    assert unexpected == [] and unused == ["cellwise_dec.map.weight"]
    assert torch.equal(m.encoder[1].post_norm2.weight, C.load_cellfm(CKPT)["encoder.1.post_norm2.weight"])


@needs_fixture
def test_other_formats_and_convert(tmp_path):
    sd = C.load_cellfm(CKPT)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w.pt")
    assert all(torch.equal(v, sd[k]) for k, v in C.load_cellfm(str(tmp_path / "w.pt")).items())
    run_script("convert.py", "--cellfm", CKPT, tmp_path / "w.safetensors")
    st = C.load_cellfm(str(tmp_path / "w.safetensors"))
    assert st.keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in st.items())


@needs_fixture
def test_wrong_vocabulary_names_key_and_shapes():
    cfg = M.tiny(n_genes=G, hist_dim=48, vocab=200)
    m = M.Hinge(cfg, torch.arange(1, G + 1))
    with pytest.raises(C.CheckpointError, match=r"gene_emb: checkpoint \(64, 32\) vs model \(208, 32\).*vocabulary"):
        C.load_backbone(m, C.load_cellfm(CKPT), CKPT)


@needs_fixture
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_ckpt_is_reported_as_truncated(tmp_path, keep):
    data = open(CKPT, "rb").read()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.load_cellfm(str(bad))


def test_missing_backbone_keys_are_named(tmp_path):
    m = tiny_model()
    sd = {k: v for k, v in m.backbone_state_dict().items() if k != "value_dec.w1.weight"}
    with pytest.raises(C.CheckpointError, match="missing backbone keys value_dec.w1.weight"):
        C.load_backbone(m, sd)


# ----------------------------------------------------------------------------- identity and variants

@needs_fixture
@pytest.mark.parametrize("cond, gate", [("softadaln", "residual"), ("hist-affine-ln", "residual"),
                                        ("softadaln", "sigmoid")])
def test_identity_at_init(cond, gate):
    """Untrained conditioning ignores histology; with the residual gate the model is exactly CellFM, with the
    official sigmoid gate every sublayer is scaled by sigmoid(6) = 0.9975, so it is CellFM only approximately."""
    m = tiny_model(cond=cond, gate=gate)
    C.load_backbone(m, C.load_cellfm(CKPT))
    m.eval()
    x, vis, t, hist = batch()
    bare = m(x, vis)
    outs = [m(x, vis, t, vis, m.embed_histology(torch.randn(5, 48, generator=torch.Generator().manual_seed(s)) * 3))
            for s in range(3)]
    for out in outs:
        assert torch.allclose(out, outs[0], atol=1e-6)   # the histology does not matter yet
        rel = ((out - bare).norm() / bare.norm()).item()
        assert rel < 1e-4 if gate == "residual" else 1e-4 < rel < 2e-2, rel
    if gate == "sigmoid":
        ga = m.encoder[0].adaln(torch.nn.functional.silu(torch.randn(2, 32))).chunk(6, -1)[2]
        assert torch.allclose(M.gate(ga, gate), torch.full_like(ga, 0.9975273768))


def test_no_id_init_and_no_soft_norm_break_identity():
    x, vis, t, hist = batch()
    for kw in ({"id_init": False}, {"soft_norm": False}):
        m = tiny_model(**kw).eval()
        bare, out = m(x, vis), m(x, vis, t, vis, m.embed_histology(hist))
        assert ((out - bare).norm() / bare.norm()).item() > 1e-2


def test_hinge_step_changes_only_conditioning():
    m = tiny_model()
    n = M.set_trainable(m, "hinge")
    assert n == sum(p.numel() for k, p in m.named_parameters() if not M.is_backbone_key(k))
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x, vis, t, hist = batch()
    diff = MaskedDiffusion(G, T=50)
    diff.loss(m, x, m.embed_histology(hist)).backward()
    opt.step()
    changed = {k for k, p in m.named_parameters() if not torch.equal(p, before[k])}
    frozen = {k for k, _ in m.named_parameters() if M.is_backbone_key(k)}
    assert not changed & frozen
    assert {"cond_net.hist_embedder.0.weight", "encoder.0.adaln.weight", "dec_adaln.weight"} <= changed


def test_variants_train_what_they_say():
    m = tiny_model(lora_rank=4)
    assert (m.encoder[0].attn.q_proj.lora_B == 0).all()          # LoRA starts as a no-op
    M.set_trainable(m, "backbone-lora")
    train = {k for k, p in m.named_parameters() if p.requires_grad}
    assert "encoder.0.attn.q_proj.lora_A" in train and "encoder.0.attn.q_proj.weight" not in train
    M.set_trainable(m, "decoder-tune")
    train = {k for k, p in m.named_parameters() if p.requires_grad}
    assert "value_dec.w1.weight" in train and "gene_emb" not in train
    assert M.set_trainable(m, "scratch") == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="unknown variant"):
        M.set_trainable(m, "bogus")


def test_lora_is_scaled_by_one_over_rank():
    lin = M.LoRALinear(8, 6, rank=4)
    for w in (lin.weight, lin.lora_A, lin.lora_B):
        torch.nn.init.normal_(w)
    x = torch.randn(3, 8)
    assert torch.allclose(lin(x), x @ lin.weight.T + x @ lin.lora_A.T @ lin.lora_B.T / 4, atol=1e-5)


def test_official_init_is_xavier_uniform_everywhere_but_the_zero_inits():
    """--init official: the official code's xavier_uniform on every Linear (LoRA B included, so LoRA does not
    start as a no-op), then the zero-init heads with gate biases 6; --init cellfm keeps CellFM's init."""
    m = tiny_model(lora_rank=4, gate="sigmoid", init="official")
    for name, w in [("cond_net.hist_embedder.0.weight", m.cond_net.hist_embedder[0].weight),
                    ("encoder.1.attn.v_proj.weight", m.encoder[1].attn.v_proj.weight),
                    ("encoder.0.attn.q_proj.lora_B", m.encoder[0].attn.q_proj.lora_B)]:
        bound = math.sqrt(6 / sum(w.shape))
        assert w.abs().max() <= bound and w.std() > 0.8 * bound / math.sqrt(3), name   # U(-b, b) has std b/√3
    assert (m.cond_net.hist_embedder[0].bias == 0).all() and (m.encoder[0].adaln.weight == 0).all()
    bias = m.encoder[0].adaln.bias.view(6, -1)
    assert (bias[[2, 5]] == 6).all() and (bias[[0, 1, 3, 4]] == 0).all()
    c = tiny_model(lora_rank=4, init="cellfm")
    assert (c.encoder[0].attn.q_proj.lora_B == 0).all() and c.cond_net.hist_embedder[0].weight.std() < 0.025
    beta = (8 * c.cfg.layers) ** -0.25                   # DeepNorm gain: xavier_normal std = β·sqrt(2 / (in + out))
    assert abs(c.encoder[1].attn.v_proj.weight.std().item() / (beta * math.sqrt(2 / 64)) - 1) < 0.15


def test_histology_of_wrong_dimension():
    m = tiny_model()
    with pytest.raises(ValueError, match="dimension 1536 but the model expects 48"):
        m.embed_histology(torch.randn(2, 1536))


# ----------------------------------------------------------------------------- masked diffusion

@pytest.mark.parametrize("schedule", ["poly-auto", "linear", "cosine", "power:2"])
def test_masks_nested_and_counts_follow_schedule(schedule):
    d = MaskedDiffusion(300, T=50, schedule=schedule)
    s = np.arange(51) / 50
    gamma = {"poly-auto": 1 - (1 - s) ** (np.log(300) / np.log(50)), "linear": s,
             "cosine": 0.5 * (1 - np.cos(np.pi * s)), "power:2": 1 - (1 - s) ** 2}[schedule]
    assert (np.abs(d.n_hidden.numpy() - gamma * 300) <= 1).all()  # ⌊γ(t)·G⌋, up to the float32 rounding below
    assert d.n_hidden[0] == 0 and d.n_hidden[50] == 300
    ranks = d.gene_ranks(8, "cpu")
    prev = torch.ones(8, 300, dtype=torch.bool)
    for t in range(51):
        vis = d.visible(ranks, torch.full((8,), t))
        assert (vis.sum(1) == 300 - d.n_hidden[t]).all()
        assert not (vis & ~prev).any()                   # visible at t => visible at t-1
        prev = vis
    if schedule == "poly-auto":
        assert d.n_hidden[49] == 299                     # exactly one gene visible at t = T-1


# (G, T, t) -> genes hidden by the official scheduler (float32, its order of operations), read off its own code;
# the first five are all the cases where flooring the float64 fraction is one gene off (G = 2..1000, T = 50, 100)
OFFICIAL_COUNTS = {(667, 50, 33): 556, (935, 50, 24): 637, (766, 100, 88): 730, (1000, 100, 19): 270,
                   (1000, 100, 51): 656, (300, 50, 49): 299, (300, 50, 25): 190, (263, 50, 10): 71}


@pytest.mark.parametrize("key", list(OFFICIAL_COUNTS))
def test_schedule_counts_are_the_official_ones(key):
    G, T, t = key
    assert int(MaskedDiffusion(G, T).n_hidden[t]) == OFFICIAL_COUNTS[key]


def test_curriculum_cap():
    d = MaskedDiffusion(300, T=50)
    cap = d.curriculum_cap(0.2)
    assert d.n_hidden[cap] <= 60 < d.n_hidden[cap + 1]


class Recorder(torch.nn.Module):
    """Stands in for the model: a learnable prediction per gene, recording what it was shown."""
    def __init__(self, G):
        super().__init__()
        self.pred = torch.nn.Parameter(torch.randn(1, G) + 10)
        self.head = PointHead()
        self.calls = []

    def embed_histology(self, hist, around=None):
        return hist

    def forward(self, x, vis, t, target, h, only=None, neighbours=None):
        self.calls.append((x.clone(), vis.clone(), t.clone(), target.clone()))
        return M.pick(self.pred.expand(x.shape[0], -1) + 0 * h[:, :1] + t[:, None] * 1e-3, only)


@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_loss_touches_only_newly_revealed_genes(norm):
    torch.manual_seed(0)
    d = MaskedDiffusion(G, T=10, schedule="linear", loss_norm=norm)
    rec = Recorder(G)
    x0 = torch.rand(6, G)
    rec.pred = torch.nn.Parameter(torch.randn(6, G))
    loss = d.loss(rec, x0, torch.zeros(6, 1))
    loss.backward()
    _, vis, t, target = rec.calls[0]
    new = target & ~vis
    assert torch.equal(rec.pred.grad != 0, new)
    xt = rec.calls[0][0]
    assert torch.equal(xt[vis], x0[vis]) and not torch.isclose(xt[~vis], x0[~vis]).any()  # hidden = noise
    err = (rec.pred.detach() + t[:, None] * 1e-3 - x0) ** 2 * new   # what the Recorder returned
    expect = err.sum() / new.sum() if norm == "batch" else (err.sum(1) / new.sum(1).clamp_min(1)).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_sampler_reveals_every_gene_once_with_no_fill_left():
    d = MaskedDiffusion(G, T=50)
    rec = Recorder(G)
    mean, samples, steps = generate(rec, d, torch.zeros(3, 1), K=50, n_samples=1,
                                      generator=torch.Generator().manual_seed(0), record=(0, 25, 49))
    # one call per step that reveals a gene or is recorded (the record asks for every gene's prediction)
    reveals = [int(d.n_hidden[t] - d.n_hidden[t - 1]) for t in range(50, 0, -1)]
    assert len(rec.calls) == sum(n > 0 or k in (0, 25, 49) for k, n in enumerate(reveals)) < 50
    revealed = torch.zeros(3, G, dtype=torch.long)
    for x, vis, t, target in rec.calls:
        revealed += (target & ~vis).long()
    assert (revealed == 1).all()
    # every final value is the prediction made when the gene was revealed: no N(0,1) fill survives
    expect = torch.zeros(3, G)
    for x, vis, t, target in rec.calls:
        new = target & ~vis
        expect[new] = (rec.pred.expand(3, -1) + t[:, None] * 1e-3)[new].detach()
    assert torch.allclose(mean, expect) and (mean > 5).all()
    assert set(steps) == {0, 25, 49} and samples.shape == (1, 3, G)


@pytest.mark.parametrize("preset", ["tiny", "scgpt-tiny"])
@pytest.mark.parametrize("head", ["gaussian", "bins"])
@pytest.mark.parametrize("cond", ["softadaln", "hist-affine-ln"])
def test_the_sampler_s_shortcuts_output_what_the_whole_model_outputs(preset, head, cond):
    """`only` (the last layer computes the other genes' keys alone) and keys as positions when every row shows as
    many genes: the outputs of the genes asked for, and so the sampler's draws, are the whole forward's, bare
    backbone included."""
    torch.manual_seed(0)
    extra = {} if preset == "tiny" else {"cls_token": 60, "vocab": 61}
    cfg = M.make_config(preset, n_genes=G, hist_dim=48, head=head, cond=cond, id_init=False, **extra)
    net = C.build_model(cfg, torch.arange(1, G + 1) * 2).eval()
    with torch.no_grad():                                # away from the identity start: every path carries signal
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, vis, t, hist = batch()
    only = torch.rand(len(x), G).argsort(1)[:, :7]
    with torch.no_grad():
        h = net.embed_histology(hist)
        full, part = net(x, vis, t, vis, h), net(x, vis, t, vis, h, only)
        assert part.shape[:2] == (len(x), 7) and torch.allclose(M.pick(full, only), part, atol=1e-5)
        assert torch.allclose(M.pick(net(x, vis), only), net(x, vis, only=only), atol=1e-5)
        same = torch.rand(len(x), G).argsort(1) < 9      # 9 visible genes in every row: positions, not a mask
        mixed = torch.cat([same, vis[:1]])               # beside a row with another count: the mask
        assert vis[0].sum() != 9
        assert torch.allclose(net(x, same, t, same, h), net(x[[*range(len(x)), 0]], mixed, t[[*range(len(x)), 0]],
                                                            mixed, h[[*range(len(x)), 0]])[:len(x)], atol=1e-5)
        d = MaskedDiffusion(G, T=50)
        fast, whole = (generate(net, d, hist, 5, 2, torch.Generator().manual_seed(1), record)[1]
                       for record in ((), tuple(range(5))))
    assert torch.allclose(fast, whole, atol=1e-5)        # a recorded step runs the whole model


def test_sampler_step_budget_and_samples():
    d = MaskedDiffusion(G, T=50)
    rec = Recorder(G)
    generate(rec, d, torch.zeros(4, 1), K=5, n_samples=3)
    assert len(rec.calls) == 5 and rec.calls[0][0].shape[0] == 12
    assert [int(c[2][0]) for c in rec.calls] == [50, 40, 30, 20, 10]
    for x, vis, t, target in rec.calls:                  # conditioned on m_{t-1}, the target seen in training
        assert ((~target).sum(1) == d.n_hidden[t - 1]).all()
    for K in (0, 51):
        with pytest.raises(ValueError, match="between 1 and T=50"):
            step_times(50, K)


def test_gaussian_ddim_returns_the_predicted_x0():
    d = GaussianDiffusion(G, T=50)
    rec = Recorder(G)
    mean, _, _ = generate(rec, d, torch.zeros(2, 1), K=5, n_samples=2)
    assert torch.allclose(mean, rec.pred.detach().expand(2, -1) + 0.01, atol=1e-5)  # last call at t = 10
    assert len(rec.calls) == 5 and rec.calls[0][1].all()


def test_real_model_trains_a_few_steps_and_samples():
    m = tiny_model()
    M.set_trainable(m, "scratch")
    d = MaskedDiffusion(G, T=20)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x0 = torch.rand(16, G) * 4
    hist = torch.randn(16, 48)
    losses = []
    for _ in range(30):
        loss = d.loss(m, x0, m.embed_histology(hist))
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    m.eval()
    mean, samples, _ = generate(m, d, hist[:4], K=4, n_samples=2)
    assert mean.shape == (4, G) and torch.isfinite(mean).all()


def test_randmask_loss_covers_all_hidden_genes():
    torch.manual_seed(0)
    d = MaskedDiffusion(G, T=50)
    rec = Recorder(G)
    rec.pred = torch.nn.Parameter(torch.randn(64, G))
    d.loss(rec, torch.rand(64, G), torch.zeros(64, 1), mask_ratio="uniform").backward()
    _, vis, t, target = rec.calls[0]
    assert target.all() and torch.equal(rec.pred.grad != 0, ~vis)
    hidden = (~vis).sum(1)
    assert hidden.min() >= 1 and hidden.float().std() > 3     # a different share per sample
    assert ((d.n_hidden[t] - hidden).abs() <= G // 10).all()  # t is the schedule step nearest that share


def test_curriculum_limits_t():
    torch.manual_seed(0)
    d = MaskedDiffusion(G, T=50)
    rec = Recorder(G)
    cap = d.curriculum_cap(0.2)
    for _ in range(20):
        d.loss(rec, torch.rand(16, G), torch.zeros(16, 1), t_max=cap)
    ts = torch.cat([c[2] for c in rec.calls])
    assert ts.max() == cap and ts.min() == 1
    assert ((~torch.cat([c[1] for c in rec.calls])).float().mean(1) <= 0.2 + 1e-6).all()
