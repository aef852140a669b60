"""scores.py on synthetic predictive distributions and gene-gene structures with known answers."""
import numpy as np
import pytest

import scores as S


@pytest.fixture
def gaussian_truth():
    """Truth drawn entry by entry from N(mu, sigma²), sigma varying over spots and genes: 100,000 entries."""
    rng = np.random.default_rng(0)
    mu = rng.normal(3, 1, (2000, 50))
    sigma = rng.uniform(0.2, 2.0, (2000, 50))
    return mu + sigma * rng.normal(size=mu.shape), mu, sigma


def test_calibrated_gaussian_covers_its_nominal_levels(gaussian_truth):
    truth, mu, sigma = gaussian_truth
    # 100,000 independent entries: a coverage's binomial sd is at most 0.0016, so 0.01 is > 6 sd
    np.testing.assert_allclose(S.calibration(truth, mu, sigma), S.LEVELS, atol=0.01)
    assert S.covered(truth, mu, 0.5 * sigma, 0.9).mean() < 0.8      # too narrow: undercovers
    assert S.covered(truth, mu, 2 * sigma, 0.5).mean() > 0.6        # too wide: overcovers


def test_calibrated_distribution_has_the_lowest_crps(gaussian_truth):
    truth, mu, sigma = gaussian_truth
    gauss = {f: S.crps_gaussian(truth, mu, f * sigma).mean() for f in (0.5, 1, 2)}
    assert gauss[1] < gauss[0.5] and gauss[1] < gauss[2], gauss
    rng = np.random.default_rng(1)
    n = 500                                               # sample form on a subset of spots, 30 samples each
    samples = {f: (mu[:n] + f * sigma[:n] * rng.normal(size=(30, n, 50))).astype(np.float16) for f in (0.5, 1, 2)}
    energy = {f: S.crps_samples(truth[:n], samples[f]).mean() for f in (0.5, 1, 2)}
    assert energy[1] < energy[0.5] and energy[1] < energy[2], energy
    x = samples[1].astype(np.float64)                     # the samples' mean ± std intervals cover as the Gaussian
    cover = [S.covered(truth[:n], x.mean(0), x.std(0, ddof=1), q).mean() for q in (0.5, 0.9)]
    np.testing.assert_allclose(cover, [0.5, 0.9], atol=0.03)  # 30 samples: mean and std are estimates, a bit narrow


def test_point_prediction_crps_is_its_mae():
    rng = np.random.default_rng(2)
    truth, pred = rng.normal(size=(40, 7)), rng.normal(size=(40, 7))
    np.testing.assert_array_equal(S.crps_gaussian(truth, pred, np.zeros_like(pred)), np.abs(truth - pred))
    np.testing.assert_array_equal(S.crps_samples(truth, pred[None]), np.abs(truth - pred))   # one sample


def test_energy_crps_approaches_the_gaussian_closed_form():
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=(300, 4)), rng.uniform(0.5, 2, (300, 4))
    truth = mu + sigma * rng.normal(size=mu.shape) * 1.5
    samples = mu + sigma * rng.normal(size=(4000, 300, 4))            # 300 spots: three blocks of 128
    exact = S.crps_gaussian(truth, mu, sigma)
    energy = S.crps_samples(truth, samples)
    # per entry, the Monte Carlo error is about 0.6 sigma / sqrt(4000) = 0.01 sigma
    assert (np.abs(energy - exact) < 0.06 * sigma).all()
    assert energy.mean() == pytest.approx(exact.mean(), rel=2e-3)


def test_spread_skill_follows_the_error_and_is_undefined_for_a_constant_std():
    rng = np.random.default_rng(4)
    std = rng.uniform(0.1, 2.0, (1000, 20))
    truth = std * rng.normal(size=std.shape)                          # the error's scale is the std
    per_gene, pooled = S.spread_skill(truth, np.zeros_like(truth), std)
    assert (per_gene > 0.3).all() and pooled > 0.3
    _, shuffled = S.spread_skill(truth, np.zeros_like(truth), rng.permutation(std.ravel()).reshape(std.shape))
    assert abs(shuffled) < 0.05
    per_gene_std = np.repeat(np.linspace(0.5, 2, 20)[None], 1000, 0)   # one std per gene, as ridge's Gaussian residual
    truth = per_gene_std * rng.normal(size=std.shape)
    per_gene, pooled = S.spread_skill(truth, np.zeros_like(truth), per_gene_std)
    assert np.isnan(per_gene).all() and pooled > 0.3                   # pooled: genes with larger std err more


def factor_model(rng, n, loadings, depth=None, slope=None):
    """Spots x genes from shared latent factors (plus the log depth times a per-gene slope)."""
    x = rng.normal(size=(n, loadings.shape[0])) @ loadings + 0.5 * rng.normal(size=(n, loadings.shape[1]))
    return x if depth is None else x + depth[:, None] * slope


def test_true_structure_beats_independently_shuffled_genes():
    rng = np.random.default_rng(5)
    L = rng.normal(size=(3, 30))
    truth = factor_model(rng, 1500, L)
    same_structure = factor_model(rng, 1500, L)                         # other spots, same correlations
    shuffled = np.stack([rng.permutation(c) for c in truth.T], 1)      # every gene's own values, no co-variation
    r_same, mad_same = S.structure(truth, same_structure)
    r_shuf, mad_shuf = S.structure(truth, shuffled)
    assert r_same > 0.95 and abs(r_shuf) < 0.3 and mad_same < mad_shuf


def test_depth_alone_scores_raw_structure_but_not_partial():
    rng = np.random.default_rng(6)
    n, L = 1500, rng.normal(size=(3, 30)) * 0.3
    depth = rng.normal(8, 1, n)                                         # log total counts of each spot
    slope = rng.uniform(0.1, 2.0, 30)                                   # genes differ in how much depth drives them
    truth = factor_model(rng, n, L, depth, slope)
    depth_only = 1.0 + depth[:, None] * slope * 0.9 + 0.3 * rng.normal(size=(n, 30))
    depth_and_structure = factor_model(rng, n, L, depth, 0.5 * slope)   # new spots' residuals, true correlations
    assert S.structure(truth, depth_only)[0] > 0.75                     # depth makes gene pairs co-vary
    assert abs(S.structure(truth, depth_only, depth)[0]) < 0.2
    assert S.structure(truth, depth_and_structure, depth)[0] > 0.9
    # all of it explained by depth: nothing to compare
    exact_depth = 2.0 + depth[:, None] * slope
    assert np.isnan(S.structure(truth, exact_depth, depth)).all()


def test_constant_genes_leave_both_matrices():
    rng = np.random.default_rng(7)
    L = rng.normal(size=(2, 10))
    truth, pred = factor_model(rng, 400, L), factor_model(rng, 400, L)
    truth[:, 3] = 1.0                                                   # constant in truth
    pred[:, 6] = 2.0                                                    # constant in the prediction
    keep = [g for g in range(10) if g not in (3, 6)]
    depth = rng.normal(size=400)
    for cov in (None, depth):
        got = S.structure(truth, pred, cov)
        assert np.isfinite(got).all()
        assert got == pytest.approx(S.structure(truth[:, keep], pred[:, keep], cov))


def test_sample_crps_does_not_favour_more_samples():
    """The fair estimator: 3 samples and 60 samples of the same distribution score the same on average."""
    rng = np.random.default_rng(8)
    truth = rng.normal(size=(4000, 25))
    few, many = (S.crps_samples(truth, rng.normal(size=(s, 4000, 25))).mean() for s in (3, 60))
    assert few == pytest.approx(1 / np.sqrt(np.pi), rel=0.01) and many == pytest.approx(1 / np.sqrt(np.pi), rel=0.01)


# ----------------------------------------------------------------------------- paired bootstrap of a difference

def test_bootstrap_of_a_constant_shift_is_that_shift():
    """Every spot's error of a is b's plus 0.3: each resample's difference is 0.3, so is the whole interval."""
    b = np.random.default_rng(9).gamma(2.0, size=(1, 300))
    point, lo, hi = S.paired_bootstrap([(300, S.spot_score(b + 0.3), S.spot_score(b))], n_boot=200)
    assert point == pytest.approx(0.3) and lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    assert S.paired_bootstrap([(300, S.spot_score(b), S.spot_score(b))], n_boot=200) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_has_the_normal_width_and_coverage():
    """Per-spot differences ~ N(mu, sigma²): the interval of their mean spans 2·1.96·sigma/sqrt(n) and covers mu
    in 95 % of datasets. Both methods share a spot effect 20x sigma (hard and easy spots): the pairing cancels it."""
    rng = np.random.default_rng(10)
    n, mu, sigma = 400, 0.1, 0.5
    widths, covered = [], []
    for _ in range(200):
        shared = 10.0 * rng.normal(size=(1, n))
        d = rng.normal(mu, sigma, (1, n))
        point, lo, hi = S.paired_bootstrap([(n, S.spot_score(shared + d), S.spot_score(shared))], n_boot=500,
                                           seed=int(rng.integers(1 << 30)))
        assert point == pytest.approx(d.mean())
        widths.append(hi - lo)
        covered.append(lo <= mu <= hi)
    # the mean width of 200 intervals: within 5 % of the normal one; coverage: 200 datasets, binomial sd 0.015
    assert np.mean(widths) == pytest.approx(2 * 1.96 * sigma / np.sqrt(n), rel=0.05)
    assert np.mean(covered) == pytest.approx(0.95, abs=0.04)


def test_bootstrap_averages_the_seeds_and_the_slices():
    """a's three seeds are b shifted by 0.1, 0.2, 0.6: a difference of 0.3 on one slice; a second slice with
    half as many spots and a difference of -0.1 counts as much (the mean over slices): 0.1 in all."""
    rng = np.random.default_rng(11)
    b1, b2 = rng.normal(size=(1, 200)), rng.normal(size=(1, 100))
    a1 = b1 + np.array([[0.1], [0.2], [0.6]])
    point, lo, hi = S.paired_bootstrap([(200, S.spot_score(a1), S.spot_score(b1)),
                                        (100, S.spot_score(b2 - 0.1), S.spot_score(b2))], n_boot=100)
    assert point == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_bootstrap_of_pcc50_finds_the_correlation_noise_costs():
    """Truth of 50 genes (PCC-50 = mean r); a predicts it exactly (r = 1), b with noise of the truth's variance
    (r = 1/sqrt(2) per gene). The PCC-50 difference is 1 - 1/sqrt(2), its interval narrow around it; b against
    itself is 0."""
    rng = np.random.default_rng(12)
    truth = rng.normal(size=(400, 50))
    b = truth + rng.normal(size=truth.shape)
    a_score, b_score = S.top_k_pearson(truth, truth[None]), S.top_k_pearson(truth, b[None])
    point, lo, hi = S.paired_bootstrap([(400, a_score, b_score)], n_boot=300)
    assert point == pytest.approx(1 - S.top_k_mean(S.pearson_per_gene(truth, b), 50))   # evaluate.py's PCC-50
    # per gene, r's sd is (1 - r²)/sqrt(n) = 0.025; the mean of 50 independent genes' r: 0.0035, ± 1.96 of it
    assert lo < 1 - 1 / np.sqrt(2) < hi and hi - lo == pytest.approx(2 * 1.96 * 0.025 / np.sqrt(50), rel=0.25)
    assert S.paired_bootstrap([(400, b_score, b_score)], n_boot=50) == (0.0, 0.0, 0.0)
