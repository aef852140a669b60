"""baselines.py: each method's prediction file and predictive distribution, hyper-parameters chosen
on validation only, the test slice never used to fit or choose, and their bad inputs."""
import shutil

import h5py
import numpy as np
import pytest

import baselines as B
from folds import load_fold, split_validation
from conftest import assert_user_error, run_script
from evaluate import slice_metrics


def fit(demo, method, out, *extra, check=True):
    return run_script("baselines.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1",
                      "--method", method, "--out", out, *extra, check=check)


@pytest.fixture(scope="module")
def preds(demo, tmp_path_factory):
    """Each method's own distribution (--no-calibrate); knn's with its samples, and calibrated."""
    root = tmp_path_factory.mktemp("baselines")
    for m in B.METHODS:
        fit(demo, m, root / m, "--no-calibrate")
    fit(demo, "knn", root / "knn_samples", "--save-samples", "--no-calibrate")
    fit(demo, "knn", root / "knn_calibrated", "--save-samples")
    return root


def test_calibration_scales_the_spread_and_the_samples_per_gene(demo, preds):
    """By default the spread is scaled per gene by the factor that makes the 50 % and 90 % intervals cover
    their share of the validation spots; the samples move from their mean by the same factor."""
    from folds import feature_stats
    from scores import calibration_scale
    _, _, _, X, H, _ = load_fold(str(demo / "data"), ["stain"], "demo1")
    tr, val = split_validation(len(X))
    mu, sd = feature_stats(H)
    H = ((H - mu) / sd).astype(np.float32)
    mean, std, _ = B.fit_knn(H[tr], X[tr], H[val], X[val], 42)[0](H[val])   # the factors come from validation alone
    with h5py.File(preds / "knn_calibrated" / "demo1.h5", "r") as f, \
            h5py.File(preds / "knn_samples" / "demo1.h5", "r") as g:
        scale = f["calibration_scale"][()]
        assert f.attrs["calibrated"] and not g.attrs["calibrated"] and scale.shape == (X.shape[1],)
        np.testing.assert_allclose(f["std"][()], g["std"][()] * scale, rtol=1e-5)
        np.testing.assert_array_equal(f["pred"][()], g["pred"][()])
        moved = (g["samples"][()].astype(np.float64) - g["pred"][()]) * scale + g["pred"][()]
        np.testing.assert_allclose(f["samples"][()].astype(np.float64), moved, atol=0.02)   # float16 storage
    np.testing.assert_allclose(scale, calibration_scale(X[val], mean, std), rtol=1e-6)
    assert not np.allclose(scale, 1)


def truth(demo, name="demo1"):
    with h5py.File(demo / "data" / "slices" / f"{name}.h5", "r") as s:
        return s["expr"][()], s["array"][()], s["barcode"][()], s["genes"][()]


def test_prediction_files_match_the_slice_and_beat_the_mean(demo, preds):
    X, array, barcode, genes = truth(demo)
    metrics = {}
    for m in B.METHODS:
        with h5py.File(preds / m / "demo1.h5", "r") as f:
            assert f["pred"].shape == X.shape and f["pred"].dtype == np.float32
            assert list(f["barcode"][()]) == list(barcode) and list(f["genes"][()]) == list(genes)
            assert f.attrs["method"] == m and f.attrs["spots_per_s"] > 0
            assert f["std"].shape == X.shape and f["std"].dtype == np.float32 and "samples" not in f
            std = f["std"][()]
            assert (std > 0).all() if m in ("mean", "ridge", "mlp") else (std >= 0).all() and (std > 0).mean() > 0.5
            with h5py.File(preds / m / "demo1.h5ad", "r") as ad:          # scanpy sees the spread as a layer
                np.testing.assert_array_equal(ad["layers/std"][()], std)
            metrics[m] = slice_metrics(X, f["pred"][()], array)[0]
    for m in ("ridge", "mlp", "knn"):                    # the demo's compartments are visible in the stain features
        assert metrics[m]["MSE"] < 0.95 * metrics["mean"]["MSE"], (m, metrics[m]["MSE"], metrics["mean"]["MSE"])
        assert metrics[m]["mean_r"] > 0.15, (m, metrics[m]["mean_r"])
    p = run_script("evaluate.py", "--pred", preds / "ridge", "--data", demo / "data", "--out", preds / "eval")
    assert "mean ± std" in p.stdout and (preds / "eval" / "summary.json").exists()


def test_mean_is_the_training_mean_with_the_training_spread(demo, preds):
    _, _, _, X, _, _ = load_fold(str(demo / "data"), ["stain"], "demo1")
    tr, _ = split_validation(len(X))
    with h5py.File(preds / "mean" / "demo1.h5", "r") as f:
        n = f["pred"].shape[0]
        np.testing.assert_allclose(f["pred"][()], np.repeat(X[tr].mean(0)[None], n, 0), rtol=1e-5)
        np.testing.assert_allclose(f["std"][()], np.repeat(X[tr].std(0)[None], n, 0), rtol=1e-5)


def test_knn_samples_are_the_neighbours(demo, preds):
    with h5py.File(preds / "knn_samples" / "demo1.h5", "r") as f, h5py.File(preds / "knn" / "demo1.h5", "r") as g:
        k, (N, G) = int(f.attrs["k"]), f["pred"].shape
        assert f["samples"].shape == (k, N, G) and f["samples"].dtype == np.float16 and k > 1
        x = f["samples"][()].astype(np.float64)
        np.testing.assert_allclose(x.mean(0), f["pred"][()], atol=0.01)          # float16 rounding of log2 values
        np.testing.assert_allclose(x.std(0, ddof=1), f["std"][()], atol=0.01)
        np.testing.assert_array_equal(f["pred"][()], g["pred"][()])               # samples change nothing else


def linear_problem(seed=0, n=300, d=20, g=5):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, g))
    H = rng.normal(size=(n, d))
    X = H @ W * 0.3 + rng.normal(size=(n, g)) * 2.0 + 3.0
    return H[:240], X[:240], H[240:], X[240:]


def test_ridge_penalty_is_the_validation_argmin_and_the_closed_form():
    H, X, Hv, Xv = linear_problem()
    predict, chosen = B.fit_ridge(H, X, Hv, Xv, 0)
    hm, xm = H.mean(0), X.mean(0)

    def solve(lam):                                      # independent primal solution
        Hc = H - hm
        return np.linalg.solve(Hc.T @ Hc + lam * np.eye(H.shape[1]), Hc.T @ (X - xm))
    val = [(((Hv - hm) @ solve(lam) + xm - Xv) ** 2).mean() for lam in B.RIDGE_GRID]
    assert chosen["lambda"] == B.RIDGE_GRID[int(np.argmin(val))]
    assert 0.01 < chosen["lambda"] < 1e6                  # noisy targets: neither end of the grid
    mean, std, samples = predict(Hv)
    np.testing.assert_allclose(mean, (Hv - hm) @ solve(chosen["lambda"]) + xm, rtol=1e-6, atol=1e-8)
    assert samples is None and std.shape == Xv.shape


def test_ridge_and_mlp_std_is_the_validation_residual_per_gene():
    H, X, Hv, Xv = linear_problem(2)
    predict, chosen = B.fit_ridge(H, X, Hv, Xv, 0)
    hm, xm, Hc = H.mean(0), X.mean(0), H - H.mean(0)
    W = np.linalg.solve(Hc.T @ Hc + chosen["lambda"] * np.eye(H.shape[1]), Hc.T @ (X - xm))
    residual_var = (((Hv - hm) @ W + xm - Xv) ** 2).mean(0)        # per gene, from an independent solution
    Q = np.random.default_rng(0).normal(size=(7, H.shape[1]))
    std = predict(Q)[1]
    np.testing.assert_allclose(std ** 2, np.repeat(residual_var[None], 7, 0), rtol=1e-6)
    assert residual_var.std() > 0.1 * residual_var.mean()         # the genes' residuals differ: a std per gene matters
    predict, chosen = B.fit_mlp(H.astype(np.float32), X.astype(np.float32), Hv.astype(np.float32),
                                Xv.astype(np.float32), 0, hidden=32, max_epochs=5)
    mean, std, _ = predict(Hv.astype(np.float32))
    np.testing.assert_allclose(std[0] ** 2, ((mean - Xv) ** 2).mean(0), rtol=1e-4)
    assert (std[0] ** 2).mean() == pytest.approx(chosen["val_mse"], rel=1e-4)  # the MSE that chose the epoch


def test_knn_k_is_the_validation_argmin_and_averages_the_nearest():
    H, X, Hv, Xv = linear_problem(1)
    predict, chosen = B.fit_knn(H, X, Hv, Xv, 0)
    cos = (Hv / np.linalg.norm(Hv, axis=1, keepdims=True)) @ (H / np.linalg.norm(H, axis=1, keepdims=True)).T
    order = np.argsort(-cos, axis=1)

    def brute(k):
        return X[order[:, :k]].mean(1)
    val = {k: ((brute(k) - Xv) ** 2).mean() for k in B.KNN_GRID if k <= len(H)}
    assert chosen["k"] == min(val, key=val.get)
    mean, std, samples = predict(Hv)
    np.testing.assert_allclose(mean, brute(chosen["k"]), rtol=1e-6)
    np.testing.assert_allclose(std, X[order[:, :chosen["k"]]].std(1, ddof=1), rtol=1e-6)
    assert samples.shape == (chosen["k"], len(Hv), X.shape[1])


def test_test_slice_expression_is_never_used(demo, preds, tmp_path):
    """Scrambling the held-out slice's truth changes no prediction: it is neither fitted nor used to choose."""
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    with h5py.File(data / "slices" / "demo1.h5", "r+") as s:
        s["expr"][...] = np.random.default_rng(0).permutation(s["expr"][()].ravel()).reshape(s["expr"].shape)
    for m in ("ridge", "knn"):
        run_script("baselines.py", "--data", data, "--features", "stain", "--test-slice", "demo1", "--method", m,
                   "--out", tmp_path / m)
        with h5py.File(tmp_path / m / "demo1.h5", "r") as a, h5py.File(preds / m / "demo1.h5", "r") as b:
            np.testing.assert_array_equal(a["pred"][()], b["pred"][()])


def test_bad_inputs(demo, preds, tmp_path):
    before = (preds / "ridge" / "demo1.h5").read_bytes()
    p = fit(demo, "ridge", preds / "ridge", check=False)          # existing predictions are not replaced silently
    assert_user_error(p, "exists", "--overwrite")
    assert (preds / "ridge" / "demo1.h5").read_bytes() == before
    p = run_script("baselines.py", "--data", demo / "data", "--features", "stain", "--test-slice", "nope",
                   "--method", "ridge", "--out", tmp_path / "x", check=False)
    assert_user_error(p, "nope", "not a slice")
    p = run_script("baselines.py", "--data", demo / "data", "--features", "uni", "--test-slice", "demo1",
                   "--method", "knn", "--out", tmp_path / "x", check=False)
    assert_user_error(p, "no uni features", "extract_features.py")
    p = fit(demo, "ridge", tmp_path / "x", "--save-samples", check=False)
    assert_user_error(p, "--save-samples", "only knn")
    assert not (tmp_path / "x").exists()
