"""Stage 5: metrics and figures for predicted slices (the paper's Sec. 4 metrics; README "Stages").

    python evaluate.py --pred runs/demo/pred --data runs/demo/data --out runs/demo/eval
    python evaluate.py --pred runs/x/pred --data data --k-sweep runs/x/pred_K1 runs/x/pred_K50   # + metrics vs K
    python evaluate.py --compare runs/a/eval runs/b/eval                                           # side by side

Per held-out slice: per-gene Pearson r across spots (log2 space), PCC-10/50/200 (mean of the k
largest r, Stem), mean r, MSE, MAE, bias2 (mean over genes of the squared mean error: the part of
MSE that is a wrong level per gene), RVD and gene-wise SSIM on the spot grid; then mean ± std
over slices. Genes constant in truth or prediction are excluded from r and counted. Slides
without measured expression get no metrics, only maps of the prediction and its uncertainty.

The predictive distribution, the Gaussian pred ± std (calibrated, when the run had validation spots):
  CRPS          closed form, for every method alike (stored samples are not used: calibration moves
                them about their own mean, which the samples' fair estimate rewards); a point
                prediction scores its MAE
  cover50/90    share of truth inside the central 50 % / 90 % interval pred ± z·std (ideal 0.5 / 0.9)
  spread_skill  r across spots between std and |truth - pred|, mean over genes (undefined for a
                std constant per gene); spread_skill_all: the same r pooled over all spot-gene entries
Gene-gene structure, from the G x G correlation matrices across spots of truth and prediction:
  struct_r, struct_mad  r and mean absolute difference between their off-diagonal entries
  struct_r_sample       the same for one sample (the first stored) instead of the mean
  struct_r_top          on the 40 genes most variable in truth (those of the correlation figure)
  struct_r_partial, struct_mad_partial  partial correlations given the spot's true log depth, so
                        that predicting depth alone scores nothing
"""
import argparse
import glob
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd

from common import UserError, atomic_path, decode, existing_slice, read_slice, run, write_text
from predictions import slice_layout
from scores import (LEVELS, calibration, covered, crps_gaussian, paired_bootstrap, pearson_per_gene,
                    spot_score, spread_skill, structure, top_k_mean, top_k_pearson)

GROUPS = [["PCC-10", "PCC-50", "PCC-200", "mean_r", "MSE", "MAE", "bias2", "RVD", "SSIM"],
          ["CRPS", "cover50", "cover90", "spread_skill", "spread_skill_all"],
          ["struct_r", "struct_mad", "struct_r_sample", "struct_r_top", "struct_r_partial", "struct_mad_partial"]]
METRICS = [k for group in GROUPS for k in group]


#################################################################################
#                                  Metrics                                      #
#################################################################################

def nan_mean(x):
    """Mean of the defined values; NaN when none is."""
    return float(np.nanmean(x)) if (~np.isnan(x)).any() else float("nan")


def rasterise(values, array):
    """Spot values on the (col, row) grid; cells without a spot are 0 (off tissue)."""
    cols, rows = array[:, 0] - array[:, 0].min(), array[:, 1] - array[:, 1].min()
    img = np.zeros((rows.max() + 1, cols.max() + 1), np.float64)
    img[rows, cols] = values
    return img


def ssim_per_gene(truth, pred, array):
    """Each gene's truth and prediction maps min-max scaled to [0, 1], SSIM with data_range 1
    (the HISTEX convention); NaN for genes constant in truth or prediction."""
    from skimage.metrics import structural_similarity
    out = np.full(truth.shape[1], np.nan)
    H, W = rasterise(truth[:, 0], array).shape
    win = min(7, H - (1 - H % 2), W - (1 - W % 2))       # the largest odd window that fits, at most 7
    if win < 3:
        return out
    for g in range(truth.shape[1]):
        t, p = truth[:, g], pred[:, g]
        if np.ptp(t) == 0 or np.ptp(p) == 0:
            continue
        a = rasterise((t - t.min()) / np.ptp(t), array)
        b = rasterise((p - p.min()) / np.ptp(p), array)
        out[g] = structural_similarity(a, b, data_range=1.0, win_size=win)
    return out


def slice_metrics(truth, pred, array):
    r = pearson_per_gene(truth, pred)
    var_t, var_p = truth.var(0), pred.var(0)
    ok = var_t > 0
    ssim = ssim_per_gene(truth, pred, array)
    m = {"PCC-10": top_k_mean(r, 10), "PCC-50": top_k_mean(r, 50), "PCC-200": top_k_mean(r, 200),
         "mean_r": nan_mean(r),
         "MSE": float(((truth - pred) ** 2).mean()), "MAE": float(np.abs(truth - pred).mean()),
         "bias2": float(((pred - truth).mean(0) ** 2).mean()),  # the part of MSE that is a wrong level per gene
         "RVD": float(((var_p[ok] - var_t[ok]) ** 2 / var_t[ok] ** 2).mean()),
         "SSIM": nan_mean(ssim),
         "n_genes": truth.shape[1], "n_excluded": int(np.isnan(r).sum()), "n_spots": truth.shape[0]}
    return m, r, ssim


def crps_entries(truth, pred, std):
    """CRPS of every spot-gene entry: of the Gaussian pred ± std, the distribution that calibration fits and
    coverage checks, for every method (without std: the absolute error). Not of the stored samples: calibration
    moves them about their own mean, which makes the fair estimate fall however far a few samples are pushed
    apart (two samples: max(0, |m - y| - c·|x1 - x2| / 2)), and a score should not depend on --save-samples."""
    return crps_gaussian(truth, pred, 0 if std is None else std)


def distribution_metrics(truth, pred, std):
    """CRPS, coverage and spread-skill of one slice -> (slice values, per-gene values, calibration
    curve). Without std only CRPS is defined (the MAE); the rest is NaN and the curve None."""
    crps = crps_entries(truth, pred, std)
    if std is None:
        nan = np.full(truth.shape[1], np.nan)
        cover50, cover90, skill, skill_all, curve = nan, nan, nan, float("nan"), None
    else:
        cover50, cover90 = (covered(truth, pred, std, q).mean(0) for q in (0.5, 0.9))
        (skill, skill_all), curve = spread_skill(truth, pred, std), calibration(truth, pred, std)
    per_gene = {"CRPS": crps.mean(0), "cover50": cover50, "cover90": cover90, "spread_skill": skill}
    m = {"CRPS": float(crps.mean()), "cover50": float(cover50.mean()), "cover90": float(cover90.mean()),
         "spread_skill": nan_mean(skill), "spread_skill_all": skill_all}
    return m, per_gene, curve


def top_variable(truth, n=40):
    """The n genes most variable in truth: the genes of the correlation figure."""
    return np.argsort(-truth.var(0))[:n]


def structure_metrics(truth, pred, depth, samples):
    r, mad = structure(truth, pred)
    r_partial, mad_partial = structure(truth, pred, depth)
    top = top_variable(truth)
    return {"struct_r": r, "struct_mad": mad,
            "struct_r_sample": structure(truth, samples[0])[0] if samples is not None else float("nan"),
            "struct_r_top": structure(truth[:, top], pred[:, top])[0],
            "struct_r_partial": r_partial, "struct_mad_partial": mad_partial}


def check_spread(path, pred, std, samples):
    """A stored std is [N, G] like pred and >= 0; stored samples are [S, N, G]."""
    if std is not None and std.shape != pred.shape:
        raise UserError(f"{path}: std has shape {std.shape} but pred {pred.shape}; re-write the prediction file")
    if std is not None and not (std >= 0).all():
        raise UserError(f"{path}: std has {int((~(std >= 0)).sum())} negative or NaN values; a spread is >= 0, "
                        "re-write the prediction file")
    if samples is not None and samples.shape[1:] != pred.shape:
        raise UserError(f"{path}: samples have shape {samples.shape}, not [S, {pred.shape[0]}, {pred.shape[1]}]; "
                        "re-write the prediction file")


@dataclass
class Pair:
    """One predicted slice next to its truth, rows in the same spot order."""
    name: str
    truth: np.ndarray                                    # [N, G] log2(count + 1)
    pred: np.ndarray                                     # [N, G]
    std: np.ndarray | None                               # [N, G] spread, when stored
    array: np.ndarray                                    # [N, 2] grid (col, row)
    genes: list
    attrs: dict                                          # the prediction file's attributes (K, seconds, ...)
    steps: tuple | None                                  # (x̂0 [R, N, G], their t [R]) with --record-steps
    depth: np.ndarray                                    # [N] log2 of the selected genes' total count


def load_pair(pred_path, data):
    """Prediction (and its std, when stored) and truth of one slice, rows joined by barcode, with the
    spots' true log depth."""
    name = os.path.basename(pred_path)[:-3]
    with h5py.File(pred_path, "r") as f:
        pred, bc, genes = f["pred"][()], decode(f["barcode"]), decode(f["genes"])
        std = f["std"][()] if "std" in f else None
        check_spread(pred_path, pred, std, f.get("samples"))
        attrs = dict(f.attrs)
        steps = (f["steps"][()], f["recorded_t"][()]) if "steps" in f else None
    s = read_slice(data, name, ("expr", "counts", "barcode", "genes", "array"))
    if decode(s["genes"]) != genes:
        raise UserError(f"{pred_path}: genes differ from slice {name} of {data}; evaluate against the data it was "
                        "trained on")
    if decode(s["barcode"]) != bc:
        raise UserError(f"{pred_path}: spots differ from slice {name} of {data}; re-run sample.py")
    # slices keep the selected genes' counts only: depth is their total
    depth = np.log2(s["counts"].sum(1) + 1)
    return Pair(name, s["expr"], pred, std, s["array"], genes, attrs, steps, depth)


def has_truth(path, data):
    with h5py.File(existing_slice(data, os.path.basename(path)[:-3]), "r") as s:
        return "expr" in s


def prediction_files(pred_dir, data):
    """The prediction files of a folder -> (those whose slice has measured expression, those without)."""
    files = sorted(glob.glob(os.path.join(pred_dir, "*.h5")))
    if not files:
        raise UserError(f"{pred_dir}: no prediction files (*.h5); run sample.py first")
    truth = [p for p in files if has_truth(p, data)]
    return truth, [p for p in files if p not in truth]


def evaluate_dir(pred_dir, data):
    """Every slice's metrics -> (table, per-gene table, the Pair of each slice, calibration curves per slice
    that has a std: {"calibrated": {slice: curve}, "raw": {slice: curve of the spread before calibration}})."""
    files = prediction_files(pred_dir, data)[0]
    if not files:
        return None, None, [], {}
    rows, per_gene, pairs, curves = [], [], [], {"calibrated": {}, "raw": {}}
    for path in files:
        p = load_pair(path, data)
        m, r, ssim = slice_metrics(p.truth, p.pred, p.array)
        with h5py.File(path, "r") as f:                  # samples stay on disk, read a block of spots at a time
            dist, dist_gene, curve = distribution_metrics(p.truth, p.pred, p.std)
            struct = structure_metrics(p.truth, p.pred, p.depth, f.get("samples"))
            scale = f["calibration_scale"][()] if "calibration_scale" in f else None
        rows.append({"slice": p.name, **m, **dist, **struct, "K": p.attrs.get("K"),
                     "spots_per_s": p.attrs.get("spots_per_s")})
        per_gene.append(pd.DataFrame({"slice": p.name, "gene": p.genes, "pearson": r, "ssim": ssim, **dist_gene,
                                      "var_truth": p.truth.var(0), "var_pred": p.pred.var(0)}))
        pairs.append(p)
        if curve is not None:
            curves["calibrated"][p.name] = curve
            curves["raw"][p.name] = curve if scale is None else calibration(p.truth, p.pred, p.std / scale)
    return pd.DataFrame(rows), pd.concat(per_gene), pairs, curves if curves["calibrated"] else {}


def paired_difference(dirs, ref_dirs, data, slices, n_boot=2000, seed=0):
    """PCC-50, MSE and CRPS of a method (its prediction folders, one per training seed) minus a reference
    method's, on those of `slices` that every folder predicted, each with its paired bootstrap interval over the
    test spots (scores.paired_bootstrap) -> {metric: (difference, lower, upper)}; None without such a slice."""
    names = [s for s in slices if dirs and ref_dirs and all(os.path.isfile(os.path.join(d, f"{s}.h5"))
                                                            for d in dirs + ref_dirs)]
    if not names:
        return None
    parts = {"PCC-50": [], "MSE": [], "CRPS": []}
    for s in names:
        both = []
        for group in (dirs, ref_dirs):
            preds, mse, crps = [], [], []
            for d in group:                              # each seed's prediction, spot by spot
                p = load_pair(os.path.join(d, f"{s}.h5"), data)
                crps.append(crps_entries(p.truth, p.pred, p.std).mean(1))
                preds.append(p.pred)
                mse.append(((p.truth - p.pred) ** 2).mean(1))
            both.append({"PCC-50": top_k_pearson(p.truth, preds, 50), "MSE": spot_score(mse),
                         "CRPS": spot_score(crps)})
        for k in parts:
            parts[k].append((len(p.truth), both[0][k], both[1][k]))
    return {k: paired_bootstrap(v, n_boot, seed) for k, v in parts.items()}


def summarise(df):
    return {k: {"mean": float(df[k].mean()), "std": float(df[k].std(ddof=0))} for k in METRICS}


def cell(mean, std=None):
    """A table cell; undefined values (the r of a constant predictor) print as a dash, never nan."""
    if mean != mean:
        return "–"
    return f"{mean:.3f}" + (f"±{std:.3f}" if std is not None else "")


def width(k):
    return max(13, len(k) + 2)


def table(df, summary):
    """Per-slice rows and mean ± std, one block per group of metrics."""
    blocks = []
    for keys in GROUPS:
        lines = [f"{'slice':<12}" + "".join(k.rjust(width(k)) for k in keys)]
        for _, r in df.iterrows():
            lines.append(f"{r['slice']:<12}" + "".join(cell(r[k]).rjust(width(k)) for k in keys))
        lines.append(f"{'mean ± std':<12}" + "".join(cell(summary[k]["mean"], summary[k]["std"]).rjust(width(k))
                                                     for k in keys))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


#################################################################################
#                                  Figures                                      #
#################################################################################

def fig_marker_maps(path, name, truth, pred, array, genes, markers):
    """Per marker gene: truth, the prediction on its own colour scale (its spatial pattern: diffusion
    means are often compressed, which one shared scale would hide) and the prediction on the
    truth's scale (its magnitude); each panel with its colour bar."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(markers), 3, figsize=(12, 2.9 * len(markers)), squeeze=False, layout="constrained")
    for i, g in enumerate(markers):
        j = genes.index(g)
        t, p = truth[:, j], pred[:, j]
        r = pearson_per_gene(truth[:, [j]], pred[:, [j]])[0]
        panels = [(t, f"{g}: truth", t.min(), t.max()), (p, f"predicted, own scale (r = {r:.2f})", p.min(), p.max()),
                  (p, "predicted, on the truth's scale", t.min(), t.max())]
        for k, (v, title, vmin, vmax) in enumerate(panels):
            ax = axes[i, k]
            sc = ax.scatter(array[:, 0], array[:, 1], c=v, s=14, marker="s", cmap="viridis", vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.invert_yaxis(); ax.set_aspect("equal"); ax.set_xticks([]); ax.set_yticks([])
            fig.colorbar(sc, ax=ax, shrink=0.8, label="log2(count + 1)" if k == 0 else None)
    fig.suptitle(f"{name}: the {len(markers)} marker genes, measured and predicted", fontsize=10)
    fig.savefig(path, dpi=110); plt.close(fig)


def fig_predicted_maps(path, pred_path, data, markers):
    """A slide without measured expression: each marker's prediction and its uncertainty (std over
    the samples) drawn over the H&E thumbnail, spots as discs of their true diameter."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection
    name = os.path.basename(pred_path)[:-3]
    with h5py.File(pred_path, "r") as f:
        pred, genes = f["pred"][()], decode(f["genes"])
        std = f["std"][()] if "std" in f else None
    with h5py.File(existing_slice(data, name), "r") as s:
        pixel, diameter, thumb, scale = slice_layout(s)
    xy, diam = pixel * scale, diameter * scale           # in thumbnail pixels
    lo, hi = xy.min(0) - 2 * diam, xy.max(0) + 2 * diam  # the tissue's bounding box, a spot or two around it
    cols = ([("predicted", pred, "viridis")]
            + ([("uncertainty (std over samples)", std, "magma")] if std is not None else []))
    fig, axes = plt.subplots(len(markers), len(cols), figsize=(5.2 * len(cols), 4.6 * len(markers)), squeeze=False,
                             layout="constrained")
    for i, g in enumerate(markers):
        j = genes.index(g)
        for k, (what, values, cmap) in enumerate(cols):
            ax = axes[i, k]
            if thumb is not None:
                ax.imshow(thumb)
            spots = EllipseCollection(diam, diam, 0, units="xy", offsets=xy, offset_transform=ax.transData,
                                      cmap=cmap, alpha=0.85, linewidths=0)
            spots.set_array(values[:, j])
            ax.add_collection(spots)
            ax.set_xlim(lo[0], hi[0]); ax.set_ylim(hi[1], lo[1]); ax.set_aspect("equal")
            ax.set_title(f"{g}: {what}", fontsize=10); ax.set_xticks([]); ax.set_yticks([])
            fig.colorbar(spots, ax=ax, shrink=0.8, label="log2(count + 1)")
    fig.suptitle(f"{name}: predicted expression over the H&E (no measured expression to compare with)", fontsize=11)
    fig.savefig(path, dpi=100); plt.close(fig)


def fig_ssim(path, per_gene, markers):
    import matplotlib.pyplot as plt
    g = per_gene.groupby("gene")["ssim"].mean().dropna().sort_values(ascending=False)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(np.arange(len(g)), g.values, color="0.5", lw=1)
    ranks = {m: list(g.index).index(m) for m in markers if m in g.index}
    ax.scatter(list(ranks.values()), [g[m] for m in ranks], color="crimson", zorder=3, label="markers")
    ax.text(0.98, 0.95, "\n".join(f"{m}: #{r + 1}, SSIM {g[m]:.2f}" for m, r in ranks.items()), transform=ax.transAxes,
            ha="right", va="top", fontsize=8, color="crimson")
    ax.set_xlabel("genes, sorted by SSIM"); ax.set_ylabel("SSIM (mean over slices)")
    ax.set_title("Gene-wise SSIM of predicted vs true maps; markers in red", fontsize=10)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def fig_correlation(path, name, truth, pred, genes, m):
    """Gene-gene correlation of the genes most variable in truth, truth vs prediction, both in the
    truth's clustering order; the title gives struct_r on these genes and on all (m: the slice's metrics)."""
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import leaves_list, linkage
    idx = top_variable(truth)
    idx = idx[np.ptp(pred[:, idx], 0) > 0]               # exact constancy: a float32 std of equal values is not 0
    ct = np.corrcoef(truth[:, idx].T)
    order = leaves_list(linkage(truth[:, idx].T, "average", metric="correlation"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.6), layout="constrained")
    for ax, c, title in [(axes[0], ct, "truth"), (axes[1], np.corrcoef(pred[:, idx].T), "prediction")]:
        im = ax.imshow(c[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]); ax.set_yticks(range(len(order)))
        ax.set_yticklabels([genes[idx[i]] for i in order], fontsize=7)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8, label="Pearson r across spots")
    fig.suptitle(f"{name}: gene-gene correlation of the {len(idx)} genes most variable in truth (clustered on truth, "
                 f"same order in both)\nstruct_r {cell(m['struct_r_top'])} on these genes, {cell(m['struct_r'])} "
                 f"on all {len(genes)}; depth partialled out: {cell(m['struct_r_partial'])}", fontsize=10)
    fig.savefig(path, dpi=110); plt.close(fig)


def fig_calibration(path, curves):
    """Observed coverage of the central predictive intervals against their nominal level, per slice
    and the mean over slices, with the raw spread dashed; on the diagonal the intervals are calibrated."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="calibrated")
    cal, raw = curves["calibrated"], curves["raw"]
    for c in cal.values():
        ax.plot(LEVELS, c, color="0.75", lw=0.8)
    ax.plot(LEVELS, np.mean(list(cal.values()), 0), "o-", color="crimson", label=f"mean over {len(cal)} slice(s)")
    if any(raw[n] is not cal[n] for n in cal):           # the prediction was calibrated: show what it was before
        ax.plot(LEVELS, np.mean(list(raw.values()), 0), "o--", color="crimson", mfc="none", label="raw spread")
    ax.set_xlim(0, 1); ax.set_ylim(0, 1); ax.set_aspect("equal")
    ax.set_xlabel("nominal level of the central interval pred ± z·std"); ax.set_ylabel("observed coverage of truth")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Calibration: below the diagonal = overconfident", fontsize=10)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def fig_metrics_vs_k(path, sweep):
    import matplotlib.pyplot as plt
    fig, ax1 = plt.subplots(figsize=(5.5, 3.5))
    ks = sorted(sweep)
    ax1.plot(ks, [sweep[k]["PCC-50"] for k in ks], "o-", label="PCC-50")
    ax1.plot(ks, [sweep[k]["mean_r"] for k in ks], "s-", label="mean r")
    ax1.set_xscale("log"); ax1.set_xlabel("step budget K"); ax1.set_ylabel("Pearson r")
    ax2 = ax1.twinx()
    ax2.plot(ks, [sweep[k]["spots_per_s"] for k in ks], "^--", color="0.4", label="spots/s")
    ax2.set_ylabel("spots/s (sampling)")
    ax1.legend(loc="lower left", fontsize=8); ax2.legend(loc="upper right", fontsize=8)
    ax1.set_title("Accuracy and speed against the step budget K", fontsize=10)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def fig_steps(path, name, truth, steps):
    import matplotlib.pyplot as plt
    x0, ts = steps
    pcc = [np.nanmean(pearson_per_gene(truth, x)) for x in x0]
    mse = [((truth - x) ** 2).mean() for x in x0]
    fig, ax1 = plt.subplots(figsize=(5.5, 3.5))
    ax1.plot(ts, pcc, "o-", label="mean r")
    ax1.set_xlabel("diffusion step t (T -> 0)"); ax1.set_ylabel("mean r of x̂0")
    ax1.invert_xaxis()
    ax2 = ax1.twinx(); ax2.plot(ts, mse, "s--", color="0.4", label="MSE"); ax2.set_ylabel("MSE of x̂0")
    ax1.legend(loc="center left", fontsize=8); ax2.legend(loc="center right", fontsize=8)
    ax1.set_title(f"{name}: quality of the intermediate x̂0 along sampling", fontsize=10)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


#################################################################################
#                                    Main                                       #
#################################################################################

def compare(dirs):
    runs = []
    for d in dirs:
        p = os.path.join(d, "summary.json")
        if not os.path.isfile(p):
            raise UserError(f"{p} not found; run evaluate.py --out {d} first")
        s = json.load(open(p))
        m = s["metrics"]                                 # an evaluation older than a metric shows it as a dash
        runs.append((s.get("label", d), {k: cell(m[k]["mean"], m[k]["std"]) if k in m else "–" for k in METRICS}))
    w = max(len(label) for label, _ in runs) + 2
    for keys in GROUPS:
        print(f"{'run':<{w}}" + "".join(k.rjust(width(k) + 1) for k in keys))
        for label, cells in runs:
            print(f"{label:<{w}}" + "".join(cells[k].rjust(width(k) + 1) for k in keys))
        print()


def draw_blind(a, out, blind):
    """Predicted maps over the H&E for slides without spatial data; markers: --markers, else the
    genes whose prediction varies most across spots."""
    paths = []
    for p in blind:
        with h5py.File(p, "r") as f:
            genes, var = decode(f["genes"]), f["pred"][()].var(0)
        markers = a.markers.split(",") if a.markers else [genes[i] for i in np.argsort(-var)[:4]]
        if unknown := [m for m in markers if m not in genes]:
            raise UserError(f"--markers {', '.join(unknown)}: not among the {len(genes)} predicted genes")
        paths.append(os.path.join(out, f"predicted_{os.path.basename(p)[:-3]}.png"))
        fig_predicted_maps(paths[-1], p, a.data, markers)
    print("figures: " + ", ".join(paths))


def score(a, out):
    """Metrics, tables and figures for the slices with measured expression."""
    df, per_gene, pairs, curves = evaluate_dir(a.pred, a.data)
    summary = summarise(df)
    for fname, frame in [("metrics.csv", pd.concat([df, pd.DataFrame([
                             {"slice": "mean", **{k: v["mean"] for k, v in summary.items()}},
                             {"slice": "std", **{k: v["std"] for k, v in summary.items()}}])])),
                         ("per_gene.csv", per_gene)]:
        with atomic_path(os.path.join(out, fname)) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.5f")
    sweep = {}
    for d in [a.pred, *a.k_sweep]:
        dd = df if d == a.pred else evaluate_dir(d, a.data)[0]
        if dd is None or dd["K"].isna().any():           # no truth there, or baselines.py predictions (no step budget)
            continue
        sweep[int(dd["K"].iloc[0])] = {"PCC-50": dd["PCC-50"].mean(), "mean_r": dd["mean_r"].mean(),
                                       "spots_per_s": dd["spots_per_s"].mean()}
    write_text(os.path.join(out, "summary.json"), json.dumps(
        {"label": a.label or a.pred, "metrics": summary, "n_slices": len(df),
         "excluded_genes": int(df["n_excluded"].sum()),
         "K_sweep": {str(k): v for k, v in sorted(sweep.items())},
         "calibration": {"levels": LEVELS.tolist(),
                         "coverage": np.mean(list(curves["calibrated"].values()), 0).tolist(),
                         "raw_coverage": np.mean(list(curves["raw"].values()), 0).tolist(),
                         "per_slice": {n: c.tolist() for n, c in curves["calibrated"].items()}} if curves else None},
        indent=1) + "\n")

    first = pairs[0]
    name, truth, pred, array, genes, steps = first.name, first.truth, first.pred, first.array, first.genes, first.steps
    markers = a.markers.split(",") if a.markers else [genes[i] for i in top_variable(truth, 4)]
    if unknown := [m for m in markers if m not in genes]:
        raise UserError(f"--markers {', '.join(unknown)}: not among the {len(genes)} evaluated genes")
    figs = {f"maps_{name}.png": lambda f: fig_marker_maps(f, name, truth, pred, array, genes, markers),
            "ssim_per_gene.png": lambda f: fig_ssim(f, per_gene, markers)}
    if (np.ptp(pred, 0) > 0).sum() >= 2:                 # a constant predictor (baselines.py mean) has no correlations
        figs[f"correlation_{name}.png"] = lambda f: fig_correlation(f, name, truth, pred, genes, df.iloc[0])
    if curves:
        figs["calibration.png"] = lambda f: fig_calibration(f, curves)
    if len(sweep) > 1:
        figs["metrics_vs_K.png"] = lambda f: fig_metrics_vs_k(f, sweep)
    if steps is not None:
        figs[f"steps_{name}.png"] = lambda f: fig_steps(f, name, truth, steps)
    for fname, draw in figs.items():
        draw(os.path.join(out, fname))

    print(table(df, summary))
    excluded = int(df["n_excluded"].sum())
    if excluded:
        print(f"({excluded} slice-gene pairs constant in truth or prediction were excluded from r)")
    print(f"metrics: {os.path.join(out, 'metrics.csv')}, per_gene.csv, summary.json")
    print("figures: " + ", ".join(os.path.join(out, f) for f in figs))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", help="folder of prediction files (sample.py output)")
    p.add_argument("--data", help="folder written by prepare_data.py (the truth, where the slices have expression)")
    p.add_argument("--out", help="output folder (default: <pred>/../eval)")
    p.add_argument("--label", help="name of this run in --compare tables (default: the --pred folder)")
    p.add_argument("--markers", help="genes for the maps (comma-separated; default the 4 most variable in truth, or in "
                                     "the prediction for slides without expression)")
    p.add_argument("--k-sweep", nargs="*", default=[], help="more prediction folders of the same slices at other K")
    p.add_argument("--compare", nargs="+", metavar="EVAL_DIR", help="print these evaluations side by side and exit")
    a = p.parse_args()
    if a.compare:
        return compare(a.compare)
    if not (a.pred and a.data):
        raise UserError("give --pred and --data (or --compare EVAL_DIR ...)")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.pred)), "eval")
    import matplotlib
    matplotlib.use("Agg")
    os.makedirs(out, exist_ok=True)
    truth, blind = prediction_files(a.pred, a.data)
    if truth:
        score(a, out)
    if blind:
        print(f"{len(blind)} slice(s) without measured expression "
              f"({', '.join(os.path.basename(p)[:-3] for p in blind)}): "
              "no metrics for them, only maps of the prediction")
        draw_blind(a, out, blind)


if __name__ == "__main__":
    run(main)
