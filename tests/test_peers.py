"""The slide-context peers (peers/: STFlow, TRIPLEX, MERGE) and the neighbourhood context of the
spot-level methods (--context): they learn expression that only a spot's neighbours explain, they
never see a validation spot's expression while they train, and their bad inputs."""
import os
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

import peers as P
from common import UserError
from folds import Context, ContextFeatures, context_features, fold_context, load_fold, slice_geometry, split_validation
from conftest import assert_user_error, run_script
from evaluate import slice_metrics

CPU = torch.device("cpu")


def fit_cli(data, method, out, *extra, check=True):
    return run_script("baselines.py", "--data", data, "--features", "stain", "--test-slice", "demo1",
                      "--method", method, "--out", out, *extra, check=check)


def settings(epochs, **kw):
    """baselines.py's peer flags, as parsed."""
    return SimpleNamespace(**{"seed": 42, "size": "cpu", "budget_s": 0, "samples": 1, "epochs": epochs,
                              "patience": epochs, **kw})


def copy_data(demo, dst):
    shutil.copytree(demo / "data", dst, ignore=shutil.ignore_patterns("images"))
    return dst


def rewrite_slice(data, name, rows=None, **replace):
    """Keep `rows` of a slice (and of its stain features) and/or replace some of its datasets (None deletes)."""
    with h5py.File(data / "slices" / f"{name}.h5", "r+") as s, \
            h5py.File(data / "features" / "stain" / f"{name}.h5", "r+") as f:
        for g, keys in ((s, ("barcode", "pixel", "array", "counts", "expr", "img")), (f, ("barcode", "embeddings"))):
            for k in keys:
                if k in g and rows is not None:
                    v = g[k][()][rows]
                    del g[k]
                    g[k] = v
        for k, v in replace.items():
            if k in s:
                del s[k]
            if v is not None:
                s[k] = v


def truth(data, name="demo1"):
    with h5py.File(data / "slices" / f"{name}.h5", "r") as s:
        return s["expr"][()], s["array"][()]


def pcc50(data, pred):
    X, array = truth(data)
    return slice_metrics(X, pred, array)[0]["PCC-50"]


# ----------------------------------------------------------------------------- context: what it computes

def grid_slice(data, name, pitch_um, side=9, dim=3, seed=0):
    """A square grid slice at `pitch_um` (1 µm per px) with random features, written as prepare_data.py does."""
    rng = np.random.default_rng(seed)
    col, row = np.meshgrid(np.arange(side), np.arange(side))
    array = np.stack([col.ravel(), row.ravel()], 1).astype(np.int32)
    os.makedirs(data / "slices", exist_ok=True)
    with h5py.File(data / "slices" / f"{name}.h5", "w") as s:
        s["array"] = array
        s["pixel"] = (array * pitch_um + rng.normal(0, 0.01 * pitch_um, array.shape)).astype(np.float32)
        s["barcode"] = np.array([f"s{i}".encode() for i in range(len(array))])
        s.attrs.update(pixel_size_um=1.0, patch_px_native=224)
    return rng.normal(size=(len(array), dim)).astype(np.float32)


def test_context_is_the_mean_of_the_k_nearest_and_keeps_its_radius_in_um_on_a_finer_grid(tmp_path):
    H = grid_slice(tmp_path, "train", 100.0)
    r8 = 1.05 * np.sqrt(2) * 100                         # the 8th nearest spot of an interior spot is a diagonal one
    geom = slice_geometry(tmp_path, "train")
    assert geom.unit == "um" and geom.pitch == pytest.approx(100, rel=0.05)
    out = context_features(H, geom, Context(8, r8, r8 / geom.pitch), "train")
    nbr = cKDTree(geom.xy).query(geom.xy, k=9)[1][:, 1:]
    interior = ((geom.xy > 50) & (geom.xy < 750)).all(1)
    np.testing.assert_array_equal(out[:, :3], H)
    np.testing.assert_allclose(out[interior, 3:], H[nbr[interior]].mean(1), rtol=1e-5, atol=1e-6)
    # a virtual-ST grid at half the pitch: the same radius in µm now holds every spot within 2.97 of its pitches
    F = grid_slice(tmp_path, "fine", 50.0, side=15, seed=1)
    fine = slice_geometry(tmp_path, "fine")
    out = context_features(F, fine, Context(8, r8, r8 / geom.pitch), "fine")
    d = np.linalg.norm(fine.xy[:, None] - fine.xy[None], axis=-1)
    inside = (d <= r8) & ~np.eye(len(F), dtype=bool)
    np.testing.assert_allclose(out[:, 3:], (inside @ F) / inside.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert inside[112].sum() >= 24                       # an interior spot averages far more than 8 spots


def test_a_hexagonal_array_grid_without_pixels_is_one_pitch_between_all_six_neighbours(tmp_path):
    from readers import spot_grid
    _, array = spot_grid(1000, 1000, 100, "hex")         # Visium's array: columns step by 2 along a row
    os.makedirs(tmp_path / "slices")
    with h5py.File(tmp_path / "slices" / "hex.h5", "w") as s:
        s["array"], s["barcode"] = array, np.array([f"s{i}".encode() for i in range(len(array))])
    geom = slice_geometry(tmp_path, "hex")
    assert geom.unit == "grid" and geom.pitch == pytest.approx(1.0)
    d = cKDTree(geom.xy).query(geom.xy, k=8)[0]
    interior = ((geom.xy > 1.5) & (geom.xy < geom.xy.max(0) - 1.5)).all(1)
    np.testing.assert_allclose(d[interior, 1:7], 1.0, atol=1e-9)    # the six neighbours of a hexagonal grid
    assert (d[interior, 7] > 1.7).all()


def test_fold_context_radius_covers_k_neighbours_on_the_training_slides(demo):
    data = str(demo / "data")
    ctx = fold_context(data, ["stain"], "demo1", [], 8)
    assert ctx.k == 8 and 141 < ctx.radius_um < 160      # demo: square grid, 100 µm pitch, jittered; √2·100·1.05 = 148
    assert ctx.radius_pitch == pytest.approx(ctx.radius_um / 100, rel=0.05)
    _, _, _, X, H, _ = load_fold(data, ["stain"], "demo1", [], ctx)
    _, _, _, _, H0, _ = load_fold(data, ["stain"], "demo1")
    assert H.shape == (H0.shape[0], 2 * H0.shape[1])
    np.testing.assert_array_equal(H[:, :H0.shape[1]], H0)


# ----------------------------------------------------------------------------- learning from neighbours only

@pytest.fixture(scope="module")
def neighbours(demo, tmp_path_factory):
    """The demo's slices on a Her2ST-like grid (200 µm pitch, patch ≈ pitch), their real stain embeddings
    (first 12 dimensions) shuffled among each slice's spots, and expression that is a linear function of the
    mean embedding of each spot's 8 nearest spots plus noise: a spot's own features say nothing."""
    data = copy_data(demo, tmp_path_factory.mktemp("neighbours") / "data")
    rng = np.random.default_rng(0)
    names = [n for n in ("demo1", "demo2", "demo3", "demo4")]
    feats = {}
    for n in names:
        with h5py.File(data / "features" / "stain" / f"{n}.h5", "r") as f:
            feats[n] = f["embeddings"][:, :12][rng.permutation(len(f["embeddings"]))]
    pooled = np.concatenate(list(feats.values()))
    mu, sd = pooled.mean(0), pooled.std(0) + 1e-6
    G = 60
    W = rng.normal(size=(12, G))
    for n in names:
        with h5py.File(data / "slices" / f"{n}.h5", "r") as s:
            array = s["array"][()]
        pixel = (array * 217.0 + rng.normal(0, 1.5, array.shape)).astype(np.float32)
        nbr = cKDTree(pixel).query(pixel, k=9)[1][:, 1:]
        signal = ((feats[n] - mu) / sd)[nbr].mean(1) @ W
        expr = np.clip(2 + signal / signal.std(0) + 0.3 * rng.normal(size=signal.shape), 0, None).astype(np.float32)
        rewrite_slice(data, n, pixel=pixel, expr=expr, counts=(2 ** expr - 1).astype(np.float32),
                      genes=np.array([f"G{i}".encode() for i in range(G)]), gene_ids=np.zeros(G, np.int64))
        with h5py.File(data / "slices" / f"{n}.h5", "r+") as s:
            s.attrs["pixel_size_um"] = 200 / 217         # Her2ST: 200 µm between spots; patches 224 px ≈ one pitch
        with h5py.File(data / "features" / "stain" / f"{n}.h5", "r+") as f:
            del f["embeddings"]
            f["embeddings"] = feats[n].astype(np.float32)
    return data


@pytest.fixture(scope="module")
def ridge_without_context(neighbours, tmp_path_factory):
    out = tmp_path_factory.mktemp("ridge")
    fit_cli(neighbours, "ridge", out)
    with h5py.File(out / "demo1.h5", "r") as f:
        return pcc50(neighbours, f["pred"][()])


def test_ridge_without_context_learns_nothing(ridge_without_context):
    assert abs(ridge_without_context) < 0.15


def test_ridge_with_context_learns_the_neighbours(neighbours, ridge_without_context, tmp_path):
    fit_cli(neighbours, "ridge", tmp_path, "--context", "8")
    with h5py.File(tmp_path / "demo1.h5", "r") as f:
        assert f.attrs["context"] == 8
        assert pcc50(neighbours, f["pred"][()]) > 0.6


# epochs so that each fits in seconds here; each paper's budget is far larger
@pytest.mark.parametrize("method,epochs", [("stflow", 2), ("triplex", 6), ("merge", 60)])
def test_peers_learn_the_neighbours(neighbours, ridge_without_context, method, epochs):
    slides, genes, mu, sd = P.fold_slides(str(neighbours), ["stain"], "demo1", [], 0.1, 42, CPU)
    predict, record = P.fit(P.PEERS[method], slides, len(genes), settings(epochs), CPU)
    mean, std, samples = predict(P.load_slide(str(neighbours), ["stain"], "demo1", mu, sd, CPU))
    score = pcc50(neighbours, mean)
    # here: 0.71, 0.36, 0.54 vs 0.02
    assert score > 0.25 and score > ridge_without_context + 0.2, (method, score, record)


# ----------------------------------------------------------------------------- the validation spots

def test_fold_slides_hold_out_load_folds_validation_spots(demo):
    data = str(demo / "data")
    _, _, _, X, H, _ = load_fold(data, ["stain"], "demo1")
    tr, val = split_validation(len(X))
    slides, _, mu, sd = P.fold_slides(data, ["stain"], "demo1", [], 0.1, 42, CPU)
    cat = lambda key, mask: torch.cat([getattr(s, key)[getattr(s, mask)] for s in slides]).numpy()  # noqa: E731
    np.testing.assert_array_equal(cat("expr", "val"), X[np.sort(val)])
    np.testing.assert_array_equal(cat("expr", "target"), X[np.sort(tr)])
    np.testing.assert_allclose(cat("feats", "val"), ((H - mu) / sd)[np.sort(val)], rtol=1e-5, atol=1e-5)
    assert not any((s.val & s.target).any() for s in slides)


@pytest.mark.parametrize("method", list(P.PEERS))
def test_validation_expression_never_reaches_training(demo, method):
    """Every expression a model may not learn from (validation and all-zero spots) is NaN: any of it used as
    an input or a target would turn the loss and the weights into NaN. Whole-slide predictions read none."""
    slides, genes, _, _ = P.fold_slides(str(demo / "data"), ["stain"], "demo1", [], 0.1, 42, CPU)
    for s in slides:
        s.expr[~s.target] = float("nan")
    torch.manual_seed(0)
    peer = P.PEERS[method](slides, len(genes), settings(1, budget_s=5), CPU)
    before = [p.detach().clone() for p in peer.net.parameters()]
    peer.net.train()
    losses = list(peer.steps())
    peer.after_epoch(1.0)                                # as harness.train between epochs: MERGE's first one is at lr 0
    losses += list(peer.steps())
    assert len(losses) == 2 * peer.n_steps and np.isfinite(losses).all()
    after = list(peer.net.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
    peer.net.eval()
    for s in slides:
        s.expr[:] = float("nan")
        assert torch.isfinite(peer.predict(s, 2)[0]).all()


# ----------------------------------------------------------------------------- the command line on the demo

# TRIPLEX learns at 1e-4; MERGE's warm-up trains its first epoch at lr 0 and the next 40 at 1e-4
@pytest.mark.parametrize("method,epochs", [("stflow", 2), ("triplex", 5), ("merge", 12)])
def test_peer_fits_and_predicts_the_demo(demo, tmp_path, method, epochs):
    generative = P.PEERS[method].GENERATIVE
    extra = ["--save-samples", "--samples", "3"] if generative else []
    p = fit_cli(demo / "data", method, tmp_path, "--epochs", epochs, "--budget-s", "0", *extra)
    X, _ = truth(demo / "data")
    with h5py.File(tmp_path / "demo1.h5", "r") as f, h5py.File(demo / "data" / "slices" / "demo1.h5", "r") as s:
        pred, std = f["pred"][()], f["std"][()]
        assert pred.shape == std.shape == X.shape and pred.dtype == std.dtype == np.float32
        assert list(f["barcode"][()]) == list(s["barcode"][()]) and list(f["genes"][()]) == list(s["genes"][()])
        assert f.attrs["method"] == method and f.attrs["epochs"] == epochs and f.attrs["stop"] == "epochs"
        assert f.attrs["units"].startswith("log2(count + 1)") and f.attrs["training_data"] == str(demo / "data")
        assert (std > 0).mean() > 0.5 and np.isfinite(pred).all()
        if generative:
            smp = f["samples"][()].astype(np.float64)
            assert smp.shape == (3,) + X.shape and f["samples"].dtype == np.float16
            # float16 keeps 11 significant bits: a sample far out (a calibrated spread many times the draws') rounds
            # by up to |sample|·2^-11, and so do their mean and (within √1.5x) their std
            tol = 0.02 + 2.0 ** -10 * np.abs(smp).max(0)
            assert (np.abs(smp.mean(0) - pred) <= tol).all() and (np.abs(smp.std(0, ddof=1) - std) <= tol).all()
        else:
            assert "samples" not in f
            np.testing.assert_array_equal(std, np.repeat(std[:1], len(std), 0))  # one Gaussian std per gene
    with h5py.File(tmp_path / "demo1.h5ad", "r") as ad:
        np.testing.assert_array_equal(ad["layers/std"][()], std)
    mean_mse = ((X - X.mean(0)) ** 2).mean()             # the demo's compartments are in the stain features
    assert slice_metrics(X, pred, truth(demo / "data")[1])[0]["mean_r"] > 0.1
    assert ((X - pred) ** 2).mean() < 1.5 * mean_mse, p.stdout


def test_peer_flags_that_do_not_apply(demo, tmp_path):
    for extra, words in ((["--method", "stflow", "--context", "8"], ("--context", "stflow")),
                         (["--method", "merge", "--save-samples"], ("--save-samples", "merge")),
                         (["--method", "stflow", "--samples", "0"], ("--samples", "at least one"))):
        p = run_script("baselines.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1",
                       "--out", tmp_path / "x", *extra, check=False)
        assert_user_error(p, *words)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def fitted(demo):
    """Each peer after one epoch on the demo (demo1 held out), with the fold's statistics."""
    slides, genes, mu, sd = P.fold_slides(str(demo / "data"), ["stain"], "demo1", [], 0.1, 42, CPU)
    return {m: P.fit(c, slides, len(genes), settings(1), CPU)[0] for m, c in P.PEERS.items()}, mu, sd


def predict_all(fitted, data, name="demo1"):
    predictors, mu, sd = fitted
    slide = P.load_slide(str(data), ["stain"], name, mu, sd, CPU)
    out = {m: f(slide) for m, f in predictors.items()}
    for m, (mean, std, _) in out.items():
        assert mean.shape == (len(slide), mean.shape[1]) and np.isfinite(mean).all() and np.isfinite(std).all(), m
    return out


@pytest.mark.parametrize("n_spots", [1, 3])
def test_a_test_slide_of_one_or_three_spots(demo, fitted, tmp_path, n_spots):
    """Fewer spots than K: the context averages the spots within its radius (none: the spot's own features);
    the peers' graphs take every other spot."""
    data = copy_data(demo, tmp_path / "data")
    with h5py.File(data / "slices" / "demo1.h5", "r") as s:
        rows = np.argsort(np.linalg.norm(s["pixel"][()] - s["pixel"][0], axis=1))[:n_spots]  # a spot and its nearest
    rewrite_slice(data, "demo1", np.sort(rows))
    predict_all(fitted, data)
    fit_cli(data, "ridge", tmp_path / "ridge", "--context", "8")
    with h5py.File(tmp_path / "ridge" / "demo1.h5", "r") as f:
        assert f["pred"].shape[0] == n_spots
    ctx = fold_context(str(data), ["stain"], "demo1", [], 8)
    H = ContextFeatures(str(data), ["stain"], "demo1", ctx).read()
    D, xy = H.shape[1] // 2, slice_geometry(str(data), "demo1").xy
    inside = (np.linalg.norm(xy[:, None] - xy[None], axis=-1) <= ctx.radius_um) & ~np.eye(n_spots, dtype=bool)
    expected = np.where(inside.any(1, keepdims=True), inside @ H[:, :D] / inside.sum(1, keepdims=True).clip(1),
                        H[:, :D])
    assert inside.any() == (n_spots == 3)
    np.testing.assert_allclose(H[:, D:], expected, rtol=1e-5, atol=1e-5)


def test_k_larger_than_every_training_slide_is_an_error(demo, tmp_path):
    p = fit_cli(demo / "data", "ridge", tmp_path / "x", "--context", "5000", check=False)
    assert_user_error(p, "--context 5000", "at most")
    with pytest.raises(UserError, match="--context -1"):
        fold_context(str(demo / "data"), ["stain"], "demo1", [], -1)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="no training slide has 2"):  # stflow's chunks: two training spots on a slide
        slides, genes, _, _ = P.fold_slides(str(demo / "data"), ["stain"], "demo1", [], 0.1, 42, CPU)
        for s in slides:
            s.target[:] = False
            s.target[0] = True
        P.STFlow(slides, len(genes), settings(1), CPU)


def test_a_slice_without_pixel_coordinates_uses_its_array_grid(demo, fitted, tmp_path):
    data = copy_data(demo, tmp_path / "data")
    ctx = fold_context(str(data), ["stain"], "demo1", [], 8)
    with_pixels = ContextFeatures(str(data), ["stain"], "demo1", ctx).read()
    rewrite_slice(data, "demo1", pixel=None)
    geom = slice_geometry(str(data), "demo1")
    assert geom.unit == "grid" and geom.pitch == 1.0
    without = ContextFeatures(str(data), ["stain"], "demo1", ctx).read()
    same = np.isclose(with_pixels, without, atol=1e-5).all(1)
    assert same.mean() > 0.9                             # the demo's pixels are its grid x 100 µm, jittered
    predict_all(fitted, data)
    p = fit_cli(data, "ridge", tmp_path / "ridge", "--context", "8")
    assert "no spot positions in µm" in p.stderr and (tmp_path / "ridge" / "demo1.h5").exists()


def test_a_test_slide_gridded_4x_coarser(demo, fitted, tmp_path):
    """Spots 400 µm apart: the context radius (≈ 148 µm) reaches no neighbour, so each spot's context is its
    own features, with a note; the peers predict it with a note that their neighbourhoods span other distances."""
    data = copy_data(demo, tmp_path / "data")
    with h5py.File(data / "slices" / "demo1.h5", "r") as s:
        pixel = s["pixel"][()]
    rewrite_slice(data, "demo1", pixel=(pixel * 4).astype(np.float32))
    p = fit_cli(data, "ridge", tmp_path / "ridge", "--context", "8")
    assert "no other spot within the context radius" in p.stderr
    H = ContextFeatures(str(data), ["stain"], "demo1", fold_context(str(data), ["stain"], "demo1", [], 8)).read()
    np.testing.assert_array_equal(H[:, H.shape[1] // 2:], H[:, :H.shape[1] // 2])
    predict_all(fitted, data)
    p = fit_cli(data, "merge", tmp_path / "merge", "--epochs", "1", "--budget-s", "0")
    assert "4x the training slides'" in p.stderr and (tmp_path / "merge" / "demo1.h5").exists()


# ----------------------------------------------------------------------------- train.py and sample.py

def test_train_and_sample_with_context_on_a_virtual_st_grid(demo, tmp_path):
    """train.py --context stores K and the radius; sample.py applies that radius in µm to a slide without spatial
    data gridded at half the training pitch (prepare_data.py --dataset image)."""
    run_script("train.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1", "--out",
               tmp_path / "run", "--preset", "tiny", "--variant", "scratch", "--epochs", "1", "--context", "4")
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ck["context"]["k"] == 4 and 100 <= ck["context"]["radius_um"] < 110   # the 4 side neighbours, 100 µm away
    assert ck["config"]["hist_dim"] == 2 * 74
    run_script("prepare_data.py", "--dataset", "image", "--image", demo / "data" / "images" / "demo1.tif",
               "--spot-pitch-um", "50", "--out", tmp_path / "slide")
    run_script("extract_features.py", "--data", tmp_path / "slide", "--encoder", "stain")
    run_script("sample.py", "--run", tmp_path / "run", "--data", tmp_path / "slide", "--slices", "demo1",
               "--steps", "1", "--samples", "1", "--out", tmp_path / "pred")
    with h5py.File(tmp_path / "pred" / "demo1.h5", "r") as f, \
            h5py.File(tmp_path / "slide" / "slices" / "demo1.h5", "r") as s:
        assert f["pred"].shape[0] == len(s["barcode"]) and np.isfinite(f["pred"][()]).all()
    geom = slice_geometry(str(tmp_path / "slide"), "demo1")
    assert geom.unit == "um" and geom.pitch == pytest.approx(50, rel=0.05)
    H = ContextFeatures(str(tmp_path / "slide"), ["stain"], "demo1", ck["context"]).read()
    n_inside = (cKDTree(geom.xy).query_ball_point(geom.xy, ck["context"]["radius_um"], return_length=True) - 1)
    assert np.median(n_inside) >= 12                     # 2x finer hexagonal grid: the same area holds ~3x the spots
    assert not np.allclose(H[:, 74:], H[:, :74])


@pytest.fixture(scope="module")
def grid_slide(demo, tmp_path_factory):
    """demo1's image alone, as a slide without spatial data, gridded at half the training pitch."""
    out = tmp_path_factory.mktemp("grid") / "slide"
    run_script("prepare_data.py", "--dataset", "image", "--image", demo / "data" / "images" / "demo1.tif",
               "--spot-pitch-um", "100", "--out", out)
    run_script("extract_features.py", "--data", out, "--encoder", "stain")
    return out


@pytest.mark.parametrize("method, extra", [("ridge", ["--context", "4"]),
                                           ("stflow", ["--epochs", "2", "--budget-s", "0"])])
def test_baselines_predict_a_virtual_st_grid_as_they_predict_spots(demo, grid_slide, tmp_path, method, extra):
    """baselines.py --predict-data: the fold's model predicts every slice of a slide without spatial data; at the
    grid point nearest each measured spot it agrees with its spot-mode prediction of that spot."""
    fold = ["--data", demo / "data", "--features", "stain", "--test-slice", "demo1", "--method", method, *extra]
    run_script("baselines.py", *fold, "--out", tmp_path / "spots")
    run_script("baselines.py", *fold, "--predict-data", grid_slide, "--out", tmp_path / "grid")
    assert sorted(os.listdir(tmp_path / "grid")) == ["demo1.h5", "demo1.h5ad"]
    with h5py.File(tmp_path / "grid" / "demo1.h5", "r") as g, h5py.File(grid_slide / "slices" / "demo1.h5", "r") as s, \
            h5py.File(tmp_path / "spots" / "demo1.h5", "r") as p:
        assert list(g["barcode"]) == list(s["barcode"]) and g["pred"].shape == (len(s["barcode"]), p["pred"].shape[1])
        grid_pred, spot_pred = g["pred"][()], p["pred"][()]
        assert g.attrs["calibrated"] and np.isfinite(grid_pred).all()
    spots, grid = slice_geometry(str(demo / "data"), "demo1"), slice_geometry(str(grid_slide), "demo1")
    dist, nearest = cKDTree(grid.xy).query(spots.xy)
    on = dist < 60                                          # spots on detected tissue: a grid point within 100 / √3 µm
    assert on.mean() > 0.8
    r = [np.corrcoef(a, b)[0, 1] for a, b in zip(spot_pred[on].T, grid_pred[nearest[on]].T)
         if a.std() > 0 and b.std() > 0]
    assert np.median(r) > 0.5, np.median(r)


def test_predict_data_without_features_is_one_line_error(demo, tmp_path):
    run_script("prepare_data.py", "--dataset", "image", "--image", demo / "data" / "images" / "demo1.tif",
               "--spot-pitch-um", "100", "--out", tmp_path / "slide")
    p = run_script("baselines.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1", "--method",
                   "ridge", "--predict-data", tmp_path / "slide", "--out", tmp_path / "grid", check=False)
    assert_user_error(p, "stain")
    assert not (tmp_path / "grid").exists()


def test_a_slide_read_from_disk_block_by_block_predicts_as_one_held_whole(demo, fitted, monkeypatch):
    """A slide to predict stays on disk (a 50k-spot slide's features are 300 MB): each peer projects it a block of
    rows at a time and predicts what it predicts from the whole feature matrix in memory."""
    predictors, mu, sd = fitted
    slide = P.load_slide(str(demo / "data"), ["stain"], "demo1", mu, sd, CPU)
    whole = P.Slide(slide.name, torch.cat(list(slide.feats.blocks())), slide.geom, slide.array)
    monkeypatch.setattr("peers.harness.BLOCK", 7)       # the demo slide in many blocks, the last one short
    assert len(list(slide.feats.blocks())) == -(-len(slide) // 7)
    for m, f in predictors.items():
        np.testing.assert_allclose(f(slide)[0], f(whole)[0], atol=1e-5, err_msg=m)


def test_stflow_chunks_stop_at_max_chunk(demo, monkeypatch):
    """STFlow trains on a random centre and its ⌊N·u⌋ nearest training spots; on a slide larger than a Visium
    slide a chunk stops at MAX_CHUNK spots, so that a training step's memory does not grow with the slide."""
    slides, genes, _, _ = P.fold_slides(str(demo / "data"), ["stain"], "demo1", [], 0.1, 42, CPU)
    peer = P.STFlow(slides, len(genes), settings(1), CPU)
    free = [len(peer.chunk(peer.pools[0])[1]) for _ in range(40)]
    monkeypatch.setattr(P.STFlow, "MAX_CHUNK", 5)
    capped = [len(peer.chunk(peer.pools[0])[1]) for _ in range(40)]
    assert max(free) > 5 and 2 <= min(capped) and max(capped) == 5


def test_merge_steps_its_warm_up_every_40_epochs(demo):
    """MERGE's code: Adam 1e-3 under WarmupLinearSchedule(warm-up 10, total 400), stepped after epochs 0, 40, 80, ...
    of range(401): epoch 0 at lr 0, epochs 1-40 at 1e-4, 41-80 at 2e-4, ..., 361-400 at 1e-3."""
    slides, genes, _, _ = P.fold_slides(str(demo / "data"), ["stain"], "demo1", [], 0.1, 42, CPU)
    peer = P.Merge(slides, len(genes), settings(1, budget_s=3), CPU)
    before = [p.detach().clone() for p in peer.net.parameters()]
    list(peer.steps())                                   # epoch 0, as training runs it: at lr 0 nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, peer.net.parameters()))
    lrs = []
    for _ in range(P.Merge.EPOCHS):
        lrs.append(peer.opt.param_groups[0]["lr"])
        peer.after_epoch(1.0)
    assert len(lrs) == 401
    np.testing.assert_allclose(lrs, [1e-3 * min(-(-i // 40), 10) / 10 for i in range(401)], rtol=1e-12, atol=0)
