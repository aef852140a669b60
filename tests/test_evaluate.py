"""evaluate.py metrics on hand-made predictions with known answers, and its outputs end to end."""
import json

import h5py
import numpy as np
import pandas as pd
import pytest

import evaluate as E
from conftest import assert_user_error, run_script


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


def test_point_prediction_has_crps_equal_to_mae_and_no_calibration(grid):
    truth, _ = grid
    pred = truth + np.random.default_rng(2).normal(0, 0.5, truth.shape)
    m, per_gene, curve = E.distribution_metrics(truth, pred, None)
    assert m["CRPS"] == np.abs(truth - pred).mean() and curve is None
    assert np.isnan([m["cover50"], m["cover90"], m["spread_skill"], m["spread_skill_all"]]).all()
    m0 = E.distribution_metrics(truth, pred, np.zeros_like(pred))[0]            # a zero spread is a point too
    assert m0["CRPS"] == m["CRPS"] and m0["cover90"] == 0


def write_slice(root, name, counts, array):
    with h5py.File(root / "slices" / f"{name}.h5", "w") as s:
        s["counts"], s["expr"] = counts, np.log2(counts + 1)
        s["barcode"] = np.array([f"{c}x{r}".encode() for c, r in array])
        s["genes"] = np.array([f"G{g}".encode() for g in range(counts.shape[1])])
        s["array"] = array.astype(np.int32)


def write_prediction(path, data, name, pred, std=None, samples=None):
    with h5py.File(data / "slices" / f"{name}.h5", "r") as s, h5py.File(path, "w") as f:
        f["pred"], f["barcode"], f["genes"] = pred.astype(np.float32), s["barcode"][()], s["genes"][()]
        if std is not None:
            f["std"] = std.astype(np.float32)
        if samples is not None:
            f["samples"] = samples.astype(np.float16)


def test_pushing_two_calibrated_samples_apart_cannot_lower_crps(tmp_path, grid):
    """Two samples drawn from the truth's own distribution, calibrated by factors c as sample.py does (moved about
    their mean): evaluate.py's CRPS rises once c is far too wide, and does not depend on whether samples are
    stored; the samples' fair estimate, the old rule, kept falling (max(0, |m - y| - c·|x1 - x2| / 2))."""
    from scores import calibrate, crps_samples
    _, array = grid
    rng = np.random.default_rng(4)
    rate = np.exp(rng.uniform(0, 3, 30)) * np.ones((len(array), 1))
    (tmp_path / "slices").mkdir()
    counts = rng.poisson(rate).astype(np.float32)
    write_slice(tmp_path, "s", counts, array)
    truth = np.log2(counts + 1)
    raw = np.log2(rng.poisson(rate, (2, *rate.shape)) + 1.0)
    mean, std = raw.mean(0), raw.std(0, ddof=1)
    crps, fair = {}, {}
    for c in (1, 50):
        c_std, moved = calibrate(mean, std, raw, np.full(30, float(c)))
        for keep in (True, False):
            (tmp_path / f"pred{c}{keep}").mkdir()
            write_prediction(tmp_path / f"pred{c}{keep}" / "s.h5", tmp_path, "s", mean, c_std, moved if keep else None)
            crps[c, keep] = E.evaluate_dir(tmp_path / f"pred{c}{keep}", tmp_path)[0]["CRPS"][0]
        fair[c] = crps_samples(truth, moved.astype(np.float16)).mean()
    assert crps[1, True] == crps[1, False] and crps[50, True] == crps[50, False]
    assert crps[50, True] > 3 * crps[1, True]
    assert fair[50] < fair[1]                            # what the samples' fair estimate said instead


@pytest.fixture
def folders(tmp_path, grid):
    """Two slices of Poisson counts on the 10 x 12 grid; a prediction with samples for one, a Gaussian
    (pred, std) for the other."""
    _, array = grid
    rng = np.random.default_rng(3)
    (tmp_path / "data" / "slices").mkdir(parents=True)
    (tmp_path / "pred").mkdir()
    for k, name in enumerate(("s1", "s2")):
        rate = np.exp(np.sin(array[:, :1] / (2.0 + k)) * rng.uniform(0.5, 2, 30) + rng.uniform(0, 2, 30))
        write_slice(tmp_path / "data", name, rng.poisson(rate).astype(np.float32), array)
        samples = np.log2(rng.poisson(rate, (8, *rate.shape)) + 1.0)  # the data's own distribution
        if name == "s1":
            write_prediction(tmp_path / "pred" / "s1.h5", tmp_path / "data", name, samples.mean(0),
                             samples.std(0, ddof=1), samples)
        else:
            write_prediction(tmp_path / "pred" / "s2.h5", tmp_path / "data", name, samples.mean(0),
                             samples.std(0, ddof=1))
    return tmp_path


def test_evaluate_writes_distribution_and_structure_metrics(folders):
    p = run_script("evaluate.py", "--pred", folders / "pred", "--data", folders / "data", "--out", folders / "eval",
                   "--label", "toy")
    assert "CRPS" in p.stdout and "struct_r_partial" in p.stdout
    ev = folders / "eval"
    per_gene = pd.read_csv(ev / "per_gene.csv")
    assert {"CRPS", "cover50", "cover90", "spread_skill"} <= set(per_gene.columns) and len(per_gene) == 60
    assert per_gene["CRPS"].notna().all() and per_gene["cover90"].between(0, 1).all()
    metrics = pd.read_csv(ev / "metrics.csv").set_index("slice")
    assert np.isnan(metrics.loc["s2", "struct_r_sample"]) and np.isfinite(metrics.loc["s1", "struct_r_sample"])
    summary = json.load(open(ev / "summary.json"))
    assert set(E.METRICS) <= set(summary["metrics"])
    cal = summary["calibration"]
    assert cal["levels"][4] == 0.5 and set(cal["per_slice"]) == {"s1", "s2"} and len(cal["coverage"]) == 9
    assert 0.6 < summary["metrics"]["cover90"]["mean"] <= 1 and summary["metrics"]["struct_r"]["mean"] > 0.5
    assert (ev / "calibration.png").stat().st_size > 0 and (ev / "correlation_s1.png").stat().st_size > 0

    old = folders / "old_eval"                            # an evaluation written before these metrics existed
    old.mkdir()
    json.dump({"label": "old", "metrics": {k: summary["metrics"][k] for k in E.GROUPS[0]}},
              open(old / "summary.json", "w"))
    p = run_script("evaluate.py", "--compare", ev, old)
    lines = p.stdout.splitlines()
    assert all(any(k in line for line in lines) for k in ("CRPS", "cover90", "struct_r", "struct_r_partial"))
    old_rows = [line for line in lines if line.startswith("old ")]
    assert old_rows[0].count("±") == len(E.GROUPS[0]) and "–" in old_rows[1] and "±" not in old_rows[1]


def test_calibrated_prediction_also_reports_its_raw_spread(folders):
    """A prediction whose std was scaled by calibration_scale: the raw curve is that of std / scale, so
    halving the raw spread lowers its coverage at every level, and summary.json keeps both curves."""
    with h5py.File(folders / "pred" / "s2.h5", "a") as f:
        f["calibration_scale"] = np.full(30, 2.0, np.float32)
    _, _, _, curves = E.evaluate_dir(str(folders / "pred"), str(folders / "data"))
    assert set(curves) == {"calibrated", "raw"}
    assert curves["raw"]["s1"] is curves["calibrated"]["s1"]          # no scale stored: raw is the calibrated curve
    assert (curves["raw"]["s2"] < curves["calibrated"]["s2"]).all()
    s2 = E.load_pair(str(folders / "pred" / "s2.h5"), str(folders / "data"))
    np.testing.assert_allclose(curves["raw"]["s2"], E.calibration(s2.truth, s2.pred, s2.std / 2))
    run_script("evaluate.py", "--pred", folders / "pred", "--data", folders / "data", "--out", folders / "eval")
    cal = json.load(open(folders / "eval" / "summary.json"))["calibration"]
    np.testing.assert_allclose(cal["raw_coverage"], (curves["raw"]["s1"] + curves["raw"]["s2"]) / 2, atol=1e-9)


@pytest.mark.parametrize("bad, words", [(lambda std: std[:, :5], ["std has shape", "(120, 5)"]),
                                        (lambda std: -std, ["negative", "std"])], ids=["wrong shape", "negative"])
def test_bad_std_is_refused_and_nothing_written(folders, bad, words):
    with h5py.File(folders / "pred" / "s2.h5", "r+") as f:
        std = f["std"][()]
        del f["std"]
        f["std"] = bad(std)
    p = run_script("evaluate.py", "--pred", folders / "pred", "--data", folders / "data", "--out", folders / "eval",
                   check=False)
    assert_user_error(p, "s2.h5", *words)
    assert not any((folders / "eval").iterdir())
