"""Scores of a predicted slice beyond the point prediction, as pure numpy functions: truth and
prediction are [N spots, G genes]; a predictive distribution is a Gaussian (pred, std) or S samples
[S, N, G] (a numpy array or an HDF5 dataset, read a block of spots at a time)."""
import numpy as np
from scipy.special import ndtr, ndtri

LEVELS = np.round(np.arange(0.1, 1.0, 0.1), 1)          # central-interval levels of the calibration curve


def pearson_per_gene(truth, pred):
    """r across spots for each gene; NaN where truth or prediction is constant."""
    t, p = truth - truth.mean(0), pred - pred.mean(0)
    ok = (np.ptp(truth, 0) > 0) & (np.ptp(pred, 0) > 0)  # exact constancy, immune to rounding in the mean
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (t * p).sum(0) / np.sqrt((t * t).sum(0) * (p * p).sum(0)), np.nan)


def pearson(a, b):
    """r between two vectors; NaN when either is constant."""
    return float(pearson_per_gene(np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[:, None])[0])


def top_k_mean(r, k):
    """PCC-k: mean of the k largest per-gene r (all valid genes when fewer than k)."""
    r = np.sort(r[~np.isnan(r)])[::-1]
    return float(r[:k].mean()) if len(r) else float("nan")


#################################################################################
#                          Predictive distributions                             #
#################################################################################

def crps_gaussian(truth, pred, std):
    """CRPS of N(pred, std²) at each entry, closed form; where std is 0 it is |truth - pred|, so a point
    prediction scores exactly its MAE."""
    err = (truth - pred).astype(np.float64)
    sd = np.where(std > 0, std, 1.0)
    z = err / sd
    crps = sd * (z * (2 * ndtr(z) - 1) + np.sqrt(2 / np.pi) * np.exp(-z * z / 2) - 1 / np.sqrt(np.pi))
    return np.where(std > 0, crps, np.abs(err))


def crps_samples(truth, samples, chunk=128):
    """CRPS from S samples at each entry, energy form: mean_i |x_i - y| - ½ mean_{i≠j} |x_i - x_j|.
    Averaging over the S(S-1) distinct pairs makes it the unbiased ("fair") estimate of the sampled
    distribution's CRPS, so methods with different numbers of samples compare fairly; one sample gives
    |x - y|. The pair term comes from the sorted samples, Σ_i (2i - S - 1) x_(i) / (S(S-1)), so the
    cost grows as S log S, not S²."""
    S, N = samples.shape[:2]
    w = ((2 * np.arange(1, S + 1) - S - 1) / max(S * (S - 1), 1))[:, None, None]
    out = np.empty(truth.shape)
    for s in range(0, N, chunk):                         # a block of spots at a time: S x chunk x G floats
        x = np.asarray(samples[:, s:s + chunk], np.float64)
        out[s:s + chunk] = np.abs(x - truth[s:s + chunk]).mean(0) - (w * np.sort(x, 0)).sum(0)
    return out


def covered(truth, pred, std, level):
    """Whether each truth value lies in the central `level` interval pred ± z·std. The Gaussian interval
    serves every method, samples or not, so all are judged by one rule."""
    return np.abs(truth - pred) <= ndtri(0.5 + level / 2) * std


def calibration(truth, pred, std):
    """Observed coverage at each nominal level of LEVELS (ideal: equal)."""
    return np.array([covered(truth, pred, std, q).mean() for q in LEVELS])


def spread_skill(truth, pred, std):
    """r between std and |truth - pred|: per gene across spots (NaN where std is constant across spots),
    and pooled over every (spot, gene) entry."""
    std, err = std.astype(np.float64), np.abs(truth - pred).astype(np.float64)
    return pearson_per_gene(std, err), pearson(std.ravel(), err.ravel())


#################################################################################
#                           Gene-gene structure                                 #
#################################################################################

def residualise(x, covariate):
    """Each column of x minus its least-squares fit on [1, covariate] across spots."""
    A = np.stack([np.ones_like(covariate), covariate], 1)
    return x - A @ np.linalg.lstsq(A, x, rcond=None)[0]


def structure(truth, pred, covariate=None):
    """(r, mean absolute difference) between the upper-triangle entries of the truth's and the
    prediction's gene-gene correlation matrices across spots. With a covariate (the spot's log depth),
    partial correlations given it: both sides residualised on the same [1, covariate]. Genes constant
    in either, or wholly explained by the covariate, have no correlation and leave both matrices."""
    t, p = truth.astype(np.float64), pred.astype(np.float64)
    if covariate is None:
        rt, rp = t - t.mean(0), p - p.mean(0)
    else:
        rt, rp = residualise(t, covariate), residualise(p, covariate)
    keep = ((np.ptp(t, 0) > 0) & (rt.std(0) > 1e-6 * t.std(0))
            & (np.ptp(p, 0) > 0) & (rp.std(0) > 1e-6 * p.std(0)))  # residuals of rounding size are no signal
    if keep.sum() < 2:
        return float("nan"), float("nan")
    upper = np.triu_indices(int(keep.sum()), 1)
    ct, cp = np.corrcoef(rt[:, keep].T)[upper], np.corrcoef(rp[:, keep].T)[upper]
    return pearson(ct, cp), float(np.abs(ct - cp).mean())


#################################################################################
#                                 Calibration                                   #
#################################################################################

def calibration_scale(truth, pred, std, grid=np.logspace(-2, 2, 161)):
    """Per gene, the one factor s on the spread whose central 50 % and 90 % intervals pred ± z·s·std cover
    closest to their share of held-out (validation) spots, the two misses summed; 1 where std is 0."""
    r = np.sort(np.abs(truth - pred) / np.where(std > 0, std, np.inf), 0)   # [N, G], per gene ascending
    N, G = r.shape
    miss = np.zeros((len(grid), G))
    for q in (0.5, 0.9):
        z = ndtri(0.5 + q / 2) * grid
        covered = np.stack([np.searchsorted(r[:, g], z, side="right") for g in range(G)], 1) / N  # [grid, G]
        miss += np.abs(covered - q)
    return np.where((std > 0).any(0), grid[miss.argmin(0)], 1.0)


def calibrate(mean, std, samples, scale):
    """A predictive distribution with its spread scaled per gene: std·s, and samples moved away from (or
    towards) their mean by the same factor. mean, std [N, G], samples [S, N, G] or None, scale [G]."""
    return std * scale, None if samples is None else mean + scale * (samples - mean)


#################################################################################
#                     Paired bootstrap of a difference                          #
#################################################################################

def spot_score(per_spot):
    """A spot-level metric (MSE or CRPS of each spot, one row per seed: [seeds, N]) -> rows -> its mean over
    those spots and the seeds."""
    per_spot = np.asarray(per_spot, np.float64).reshape(-1, np.shape(per_spot)[-1])
    return lambda rows: float(per_spot[:, rows].mean())


def top_k_pearson(truth, preds, k=50):
    """PCC-k of each seed's prediction ([seeds, N, G]) on the spots `rows` (per-gene r across those spots, the
    k best genes), averaged over the seeds -> rows -> value."""
    return lambda rows: float(np.mean([top_k_mean(pearson_per_gene(truth[rows], p[rows]), k) for p in preds]))


def paired_bootstrap(slices, n_boot=2000, seed=0, level=0.95):
    """The difference a - b of one metric between two methods, with its bootstrap interval over test spots.
    slices: per test slice, (number of spots, metric_a, metric_b), each metric a function of spot rows averaged
    over its method's seeds (spot_score, top_k_pearson). A resample draws each slice's spots with replacement,
    the same rows for both methods and every seed (paired: what the methods share, which spots are hard, cancels
    out), and averages the per-slice differences. -> (difference on all spots, lower, upper), the interval's
    ends the (1 - level)/2 and (1 + level)/2 quantiles of the resampled differences."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([a(np.arange(n)) - b(np.arange(n)) for n, a, b in slices]))
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        d = []
        for n, a, b in slices:
            rows = rng.integers(0, n, n)                 # one resample, both methods
            d.append(a(rows) - b(rows))
        diffs[i] = np.mean(d)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)
