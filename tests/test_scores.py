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
