"""baselines.py: each method's prediction file, hyper-parameters chosen on validation only,
the test slice never used to fit or choose, and their bad inputs."""
import shutil

import h5py
import numpy as np
import pytest

import baselines as B
from common import load_fold, split_validation
from conftest import assert_user_error, run_script
from evaluate import slice_metrics


def fit(demo, method, out, *extra, check=True):
    return run_script("baselines.py", "--data", demo / "data", "--features", "stain", "--test-slice", "demo1",
                      "--method", method, "--out", out, *extra, check=check)


@pytest.fixture(scope="module")
def preds(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    for m in B.METHODS:
        fit(demo, m, root / m)
    return root


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
            metrics[m] = slice_metrics(X, f["pred"][()], array)[0]
    for m in ("ridge", "mlp", "knn"):                    # the demo's compartments are visible in the stain features
        assert metrics[m]["MSE"] < 0.95 * metrics["mean"]["MSE"], (m, metrics[m]["MSE"], metrics["mean"]["MSE"])
        assert metrics[m]["mean_r"] > 0.15, (m, metrics[m]["mean_r"])
    p = run_script("evaluate.py", "--pred", preds / "ridge", "--data", demo / "data", "--out", preds / "eval")
    assert "mean ± std" in p.stdout and (preds / "eval" / "summary.json").exists()


def test_mean_is_the_training_mean(demo, preds):
    _, _, _, X, _, _ = load_fold(str(demo / "data"), ["stain"], "demo1")
    tr, _ = split_validation(len(X))
    with h5py.File(preds / "mean" / "demo1.h5", "r") as f:
        np.testing.assert_allclose(f["pred"][()], np.repeat(X[tr].mean(0)[None], f["pred"].shape[0], 0), rtol=1e-5)


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
    np.testing.assert_allclose(predict(Hv), (Hv - hm) @ solve(chosen["lambda"]) + xm, rtol=1e-6, atol=1e-8)


def test_knn_k_is_the_validation_argmin_and_averages_the_nearest():
    H, X, Hv, Xv = linear_problem(1)
    predict, chosen = B.fit_knn(H, X, Hv, Xv, 0)
    cos = (Hv / np.linalg.norm(Hv, axis=1, keepdims=True)) @ (H / np.linalg.norm(H, axis=1, keepdims=True)).T
    order = np.argsort(-cos, axis=1)

    def brute(k):
        return X[order[:, :k]].mean(1)
    val = {k: ((brute(k) - Xv) ** 2).mean() for k in B.KNN_GRID if k <= len(H)}
    assert chosen["k"] == min(val, key=val.get)
    np.testing.assert_allclose(predict(Hv), brute(chosen["k"]), rtol=1e-6)


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
    assert not (tmp_path / "x").exists()
