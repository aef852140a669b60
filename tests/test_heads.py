"""The distributional heads (train.py --head gaussian|bins) and sampling from them, on synthetic data
with a known answer: expression = f(histology) + noise whose σ depends on the histology, one bimodal
gene, and two genes whose noise is correlated given the histology."""
import math
import h5py
import numpy as np
import pytest
import torch

import model as M
from diffusion import MaskedDiffusion, generate
from heads import BetaNLLHead, GaussianHead, PointHead
from conftest import assert_user_error, run_script, train
from scores import calibrate, calibration_scale, covered

N, D = 3000, 4


def synthetic(seed=0):
    """Features H [N, D]; genes: 0-1 Gaussian with σ = 0.4·e^{h1} (0.24..0.66 over ±½), 2-3 a shared noise
    (r = 0.8 given histology), 4 bimodal (0 or 3, the chance set by h0), 5 a level set by h0."""
    g = torch.Generator().manual_seed(seed)
    H = torch.rand(N, D, generator=g) - 0.5
    sigma = 0.4 * torch.exp(H[:, 1])
    z = torch.randn(N, 3, generator=g)
    shared = torch.stack([z[:, 1], 0.8 * z[:, 1] + 0.6 * z[:, 2]], 1)
    mode = (torch.rand(N, generator=g) < 0.5 + H[:, 0]).float() * 3
    X = torch.stack([2 + 2 * H[:, 0] + sigma * z[:, 0], 3 - 2 * H[:, 0] + sigma * torch.randn(N, generator=g),
                     2.5 + 0.4 * shared[:, 0], 2.5 + 0.4 * shared[:, 1], mode + 0.05 * torch.randn(N, generator=g),
                     3 + 2 * H[:, 0]], 1).clamp_min(0)
    return X, H, sigma


def fit(head, X, H, steps=1500, seed=0):
    """A tiny HINGE with every weight trained on the first 2/3 of the spots."""
    torch.manual_seed(seed)
    G = X.shape[1]
    net = M.Hinge(M.tiny(n_genes=G, hist_dim=D, head=head, dropout=0.0), torch.arange(1, G + 1))
    if head == "bins":
        net.head.set_bins(X)
    M.set_trainable(net, "scratch")
    diffusion = MaskedDiffusion(G, T=50)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    train_rows = 2 * N // 3
    for _ in range(steps):
        b = torch.randint(0, train_rows, (128,))
        loss = diffusion.loss(net, X[b], net.embed_histology(H[b]))
        opt.zero_grad(); loss.backward(); opt.step()
    return net.eval(), diffusion


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def fitted(data):                                        # three models trained in-process: its tests are marked slow
    X, H, _ = data
    return {head: fit(head, X, H) for head in ("point", "gaussian", "bins")}


def held_out(data):
    X, H, sigma = data
    return X[2 * N // 3:], H[2 * N // 3:], sigma[2 * N // 3:]


def draws(net, diffusion, H, K=50, S=20, temperature=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return generate(net, diffusion, H, K, S, gen, temperature=temperature)


@pytest.mark.slow                                        # `fitted`: minutes of training
@pytest.mark.parametrize("head", ["gaussian", "bins"])
def test_head_recovers_sigma_and_its_samples_cover_90_percent(data, fitted, head):
    X, H, sigma = held_out(data)
    net, diffusion = fitted[head]
    mean, samples, _ = draws(net, diffusion, H, K=10)
    spread = samples[:, :, :2].std(0)                    # genes 0-1: σ depends on the histology
    ratio = (spread / sigma[:, None]).median()
    assert 0.8 < ratio < 1.2, ratio
    cover = covered(X[:, :2].numpy(), mean[:, :2].numpy(), spread.numpy(), 0.9).mean()   # evaluate.py's interval
    assert 0.85 <= cover <= 0.95, cover


@pytest.mark.slow                                        # `fitted`: minutes of training
def test_point_head_samples_are_not_a_distribution(data, fitted):
    X, H, sigma = held_out(data)
    _, samples, _ = draws(*fitted["point"], H, K=10)
    assert samples[:, :, :2].std(0).median() < 0.5 * sigma.median()


@pytest.mark.slow                                        # `fitted`: minutes of training
def test_bins_head_holds_two_modes(data, fitted):
    X, H, _ = held_out(data)
    mid = H[:, 0].abs() < 0.1                            # spots with an even chance of either mode
    gene = {}
    for head in ("gaussian", "bins"):
        _, samples, _ = draws(*fitted[head], H[mid], K=10)
        v = samples[:, :, 4].flatten()
        gene[head] = ((v < 0.75) | (v > 2.25)).float().mean()   # near a mode (0 or 3), not between them
    assert gene["bins"] > 0.85 and gene["bins"] > gene["gaussian"] + 0.2, gene


class Correlated(torch.nn.Module):
    """An exact Gaussian-head model of two genes whose noise correlates (r = 0.8) given the histology: each
    gene ~ N(2.5, 0.4²) while the other is hidden, N(2.5 + 0.8·(other - 2.5), 0.24²) once it is visible."""
    def __init__(self):
        super().__init__()
        self.head = GaussianHead(1, 2)

    def embed_histology(self, hist, around=None):
        return hist

    def forward(self, x, visible, t, target, h, only=None, neighbours=None):
        other = x.flip(1) - 2.5
        mean = 2.5 + 0.8 * other * visible.flip(1)
        var = torch.where(visible.flip(1), 0.4 ** 2 * (1 - 0.8 ** 2), 0.4 ** 2)
        return M.pick(torch.stack([mean, var.log()], -1), only)   # only: the genes the sampler reveals


def test_one_sample_is_a_joint_draw_with_the_noise_correlation():
    """Revealed values are drawn and later steps condition on them: one sample's gene-gene r is the truth's;
    revealing means (temperature 0, the point sampler) cannot reach it."""
    diffusion, H = MaskedDiffusion(2, T=50), torch.zeros(4000, 1)
    _, sample, _ = draws(Correlated(), diffusion, H, K=50, S=1)
    r = np.corrcoef(sample[0, :, 0], sample[0, :, 1])[0, 1]
    assert abs(r - 0.8) < 0.1 and abs(sample[0].std(0) - 0.4).max() < 0.05, (r, sample[0].std(0))
    _, point, _ = draws(Correlated(), diffusion, H, K=50, S=1, temperature=0)
    assert float(point[0].std(0).max()) < 1e-6           # every spot the same: no co-expression at all


class MeanOnly(torch.nn.Module):
    """A distributional model seen through its mean: what the point sampler would reveal."""
    def __init__(self, net):
        super().__init__()
        self.net, self.head = net, PointHead()

    def embed_histology(self, hist, around=None):
        return self.net.embed_histology(hist)

    def forward(self, *args):
        return self.net.head.mean(self.net(*args))


@pytest.mark.slow                                        # `fitted`: minutes of training
@pytest.mark.parametrize("head", ["gaussian", "bins"])
def test_temperature_zero_is_the_point_sampler(data, fitted, head):
    _, H, _ = held_out(data)
    net, diffusion = fitted[head]
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    with torch.no_grad():
        a = generate(net, diffusion, H[:64], 5, 3, gens[0], temperature=0)[1]
        b = generate(MeanOnly(net), diffusion, H[:64], 5, 3, gens[1])[1]
    torch.testing.assert_close(a, b)
    assert torch.equal(gens[0].get_state(), gens[1].get_state())   # no random number drawn beyond the point sampler's


def test_gaussian_head_starts_as_the_decoder():
    """Identity at initialisation: the Gaussian head's mean is the backbone decoder's value (the bins head
    starts at each gene's training marginal instead; the point head is the decoder)."""
    torch.manual_seed(0)
    G = 6
    nets = {h: M.Hinge(M.tiny(n_genes=G, hist_dim=D, head=h), torch.arange(1, G + 1)).eval()
            for h in ("point", "gaussian")}
    nets["gaussian"].load_state_dict(nets["point"].state_dict(), strict=False)
    x, vis = torch.rand(5, G) * 3, torch.rand(5, G) > 0.5
    t, hist = torch.full((5,), 10), torch.randn(5, D)
    out = {h: n(x, vis, t, vis, n.embed_histology(hist)) for h, n in nets.items()}
    torch.testing.assert_close(out["gaussian"][..., 0], out["point"])


def test_calibration_scale_recovers_a_known_factor():
    rng = np.random.default_rng(0)
    pred, std = rng.normal(size=(4000, 5)), rng.uniform(0.5, 1.5, (4000, 5))
    truth = pred + np.array([0.5, 1, 2, 3, 1]) * std * rng.normal(size=(4000, 5))
    scale = calibration_scale(truth[:2000], pred[:2000], std[:2000])
    np.testing.assert_allclose(scale, [0.5, 1, 2, 3, 1], rtol=0.1)
    fixed, _ = calibrate(pred, std, None, scale)
    for q in (0.5, 0.9):
        assert abs(covered(truth[2000:], pred[2000:], fixed[2000:], q).mean() - q) < 0.03


def test_heads_through_the_cli(demo, backbone, tmp_path):
    """train.py --head gaussian stores its validation spots; sample.py draws, calibrates by default and says so
    in the AnnData; bad flags are one-line errors that write nothing."""
    run = tmp_path / "g"
    train(demo, run, "--backbone-ckpt", backbone, "--epochs", "2", "--head", "gaussian")
    ck = torch.load(run / "best.pt", weights_only=False)
    assert ck["config"]["head"] == "gaussian" and len(ck["val_expr"]) == len(ck["val_features"]) > 0
    out = tmp_path / "pred"
    run_script("sample.py", "--run", run, "--data", demo / "data", "--samples", "3", "--out", out)
    with h5py.File(out / "demo1.h5") as f:
        assert f.attrs["head"] == "gaussian" and f.attrs["temperature"] == 0.5 and f.attrs["calibrated"]
        assert f["calibration_scale"].shape == (ck["config"]["n_genes"],) and (f["std"][()] > 0).all()
    import anndata
    ad = anndata.read_h5ad(out / "demo1.h5ad")
    assert ad.uns["prediction"]["head"] == "gaussian" and bool(ad.uns["prediction"]["calibrated"])
    assert ad.uns["prediction"]["units"].startswith("log2(count + 1) of the training data's raw counts")
    assert ad.uns["prediction"]["training_data"] != "unknown" and "HMHVG" in ad.uns["prediction"]["gene_panel"]
    raw = tmp_path / "raw"
    run_script("sample.py", "--run", run, "--data", demo / "data", "--samples", "3", "--out", raw, "--no-calibrate")
    with h5py.File(raw / "demo1.h5") as f, h5py.File(out / "demo1.h5") as g:
        assert not f.attrs["calibrated"] and "calibration_scale" not in f
        np.testing.assert_allclose(g["std"][()], f["std"][()] * g["calibration_scale"][()], rtol=1e-5)

    bad = tmp_path / "bad"
    for flags, words in [(["--temperature", "-1"], ["--temperature -1"]),
                         (["--calibrate"], ["--calibrate", "no validation spots"])]:
        target = run if flags[0] == "--temperature" else strip_validation(run, tmp_path / "imported")
        p = run_script("sample.py", "--run", target, "--data", demo / "data", "--out", bad, *flags, check=False)
        assert_user_error(p, *words)
    point = tmp_path / "p"
    train(demo, point, "--backbone-ckpt", backbone, "--epochs", "1", "--head", "point")
    p = run_script("sample.py", "--run", point, "--data", demo / "data", "--out", bad, "--temperature", "0.5",
                   check=False)
    assert_user_error(p, "--temperature 0.5", "point")
    assert not bad.exists()


def strip_validation(run, dst):
    """A copy of a run without validation spots, as an imported official checkpoint has none."""
    ck = torch.load(run / "best.pt", weights_only=False)
    ck["val_expr"] = ck["val_features"] = None
    dst.mkdir(exist_ok=True)
    torch.save(ck, dst / "best.pt")
    return dst


def test_beta_nll_weights_each_gene_by_its_own_variance_held_constant():
    """β-NLL (Seitzer et al. 2022): the Gaussian NLL times σ^(2β), β = 0.5, the weight outside the gradient."""
    out = torch.tensor([[[1.0, math.log(4.0)], [2.0, 0.0]]], requires_grad=True)   # means 1, 2; variances 4, 1
    x = torch.tensor([[3.0, 2.5]])
    beta = BetaNLLHead(4, 2).nll(out, x)
    torch.testing.assert_close(beta, GaussianHead(4, 2).nll(out, x) * torch.tensor([[2.0, 1.0]]))
    beta[0, 0].backward()
    # d/dmean of 2 · 0.5 · (x - m)² / 4 = -(x - m) / 2 = -1; d/dlogvar of 2 · 0.5 · (logvar + (x - m)² e^-logvar) = 0
    torch.testing.assert_close(out.grad[0, 0], torch.tensor([-1.0, 0.0]))
