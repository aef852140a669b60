"""evaluate.py metrics on hand-made predictions with known answers."""
import numpy as np
import pytest

import evaluate as E


@pytest.fixture
def grid():
    rng = np.random.default_rng(0)
    cols, rows = np.meshgrid(np.arange(12), np.arange(10))
    array = np.stack([cols.ravel(), rows.ravel()], 1)
    base = np.sin(array[:, :1] / 2.0) + np.cos(array[:, 1:] / 3.0)        # smooth spatial patterns
    truth = np.abs(base * rng.uniform(0.5, 2, 30) + rng.normal(0, 0.3, (120, 30))) + 0.1
    return truth, array


def test_perfect_prediction(grid):
    truth, array = grid
    m, r, ssim = E.slice_metrics(truth, truth.copy(), array)
    assert np.allclose(r, 1) and m["PCC-10"] == pytest.approx(1) and m["PCC-200"] == pytest.approx(1)
    assert m["MSE"] == 0 and m["MAE"] == 0 and m["RVD"] == 0
    assert m["SSIM"] == pytest.approx(1) and m["n_excluded"] == 0


def test_negated_prediction(grid):
    truth, array = grid
    m, r, _ = E.slice_metrics(truth, -truth, array)
    assert np.allclose(r, -1) and m["mean_r"] == pytest.approx(-1) and m["PCC-50"] == pytest.approx(-1)
    assert m["MSE"] == pytest.approx((4 * truth ** 2).mean()) and m["RVD"] == pytest.approx(0)


def test_constant_prediction_is_excluded_and_counted(grid):
    truth, array = grid
    pred = truth.copy()
    pred[:, :5] = truth[:, :5].mean(0)                  # 5 genes predicted as their mean: r undefined
    m, r, ssim = E.slice_metrics(truth, pred, array)
    assert m["n_excluded"] == 5 and np.isnan(r[:5]).all() and np.isnan(ssim[:5]).all()
    assert m["mean_r"] == pytest.approx(1) and m["PCC-200"] == pytest.approx(1)   # over the 25 valid genes
    assert m["RVD"] == pytest.approx(5 / 30)            # (0 - v)^2 / v^2 = 1 for 5 of 30 genes


def test_shuffled_prediction_has_no_correlation(grid):
    truth, array = grid
    rng = np.random.default_rng(1)
    m, r, _ = E.slice_metrics(truth, truth[rng.permutation(len(truth))], array)
    assert abs(m["mean_r"]) < 0.1 and m["PCC-10"] > m["mean_r"]     # top-k picks the luckiest genes
    assert m["SSIM"] < 0.3


def test_pcc_k_is_mean_of_k_largest():
    r = np.array([0.9, np.nan, 0.1, 0.5, -0.2, 0.7])
    assert E.top_k_mean(r, 2) == pytest.approx(0.8) and E.top_k_mean(r, 200) == pytest.approx(0.4)


def test_ssim_known_values():
    from skimage.metrics import structural_similarity
    cols, rows = np.meshgrid(np.arange(9), np.arange(9))
    array = np.stack([cols.ravel(), rows.ravel()], 1)
    t = (cols + rows).ravel()[:, None].astype(float)
    s = E.ssim_per_gene(t, 3 * t + 7, array)            # min-max scaling removes affine changes
    assert s[0] == pytest.approx(1.0)
    p = ((cols * rows) % 5).ravel()[:, None].astype(float)
    expect = structural_similarity((cols + rows) / 16.0, ((cols * rows) % 5) / 4.0, data_range=1.0, win_size=7)
    assert E.ssim_per_gene(t, p, array)[0] == pytest.approx(expect)
    raster = E.rasterise(np.arange(3.0), np.array([[5, 2], [7, 2], [5, 3]]))
    assert raster.tolist() == [[0, 0, 1], [2, 0, 0]]    # off-tissue cells are 0
