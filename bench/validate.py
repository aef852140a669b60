"""Generation quality of trained runs on their own validation spots: the diagnostic for choosing
between HINGE settings without touching the test slice (docs/results.md, bench/choose_gate.sh,
bench/choose_head.sh).

    python bench/validate.py --data runs/quality/data \
        --runs runs/quality/runs/C2/hinge runs/quality/runs/C2/scratch --steps 1,5
    python bench/validate.py --data ... --runs ... --steps 5 --samples 10 --temperatures 0,0.5,1 --csv val.csv

For each run: the fold's 10 % validation split rebuilt exactly as train.py drew it, generated at
each K (and each temperature, for a distributional head), printing mean r, PCC-50, MSE, the spread
ratio (std of the prediction over std of the truth, averaged over genes: 1 = as variable as the
truth), and the CRPS and cover90 of the Gaussian mean ± std of the samples after the per-gene
calibration sample.py applies, scored as evaluate.py scores them and cross-fitted: the scale is
fitted on one half of the validation spots and scored on the other, and the other way round. A
ridge line on the same split gives a reference.
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from baselines import fit_ridge  # noqa: E402
from checkpoints import load_run, validation_space  # noqa: E402
from diffusion import generate, generate_slide  # noqa: E402
from folds import load_fold, split_validation
from evaluate import top_k_mean  # noqa: E402
from scores import calibration_scale, covered, crps_gaussian, pearson_per_gene  # noqa: E402


def cross_fitted(truth, mean, std):
    """CRPS and cover90 of the Gaussian mean ± std, as evaluate.py scores them, with the calibration scale of the
    other half of the spots."""
    half = np.arange(len(truth)) % 2 == 0
    crps, cover = np.empty(truth.shape), np.empty(truth.shape, bool)
    for fit, score in ((half, ~half), (~half, half)):
        y, m, s = truth[score], mean[score], std[score] * calibration_scale(truth[fit], mean[fit], std[fit])
        crps[score], cover[score] = crps_gaussian(y, m, s), covered(y, m, s, 0.9)
    return float(crps.mean()), float(cover.mean())


def scores(truth, pred, std=None):
    r = pearson_per_gene(truth, pred)
    spread = np.mean(pred.std(0) / truth.std(0).clip(1e-8))
    m = {"mean_r": float(np.nanmean(r)), "PCC-50": top_k_mean(r, 50), "MSE": float(((truth - pred) ** 2).mean()),
         "bias2": float(((pred - truth).mean(0) ** 2).mean()), "spread": float(spread)}
    if std is not None:
        m["CRPS"], m["cover90"] = cross_fitted(truth, pred, std)
    return m


def show(label, m):
    print(f"{label:<44} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))


def spatial_samples(net, diffusion, ck, K, S, gen, tau):
    """A spatial run's samples [S, n_val, G] of its validation spots, generated among their neighbours as sample.py
    generates a slide (jointly for --spatial joint)."""
    space, scored = validation_space(ck)
    with torch.no_grad():
        if net.cfg.spatial == "joint":
            def embed(b, e):
                return net.embed_histology(space.features[b:e], space.around(slice(b, e)))
            return generate_slide(net, diffusion, embed, space, K, S, gen, tau)[:, scored].float().numpy()
        rows = torch.from_numpy(scored).split(32)
        return torch.cat([generate(net, diffusion, space.features[r], K, S, gen, temperature=tau,
                                   around=space.around(r))[1] for r in rows], 1).numpy()


def validation_split(ck, data):
    """The fold's training and validation spots (raw features, expression), split as train.py split them."""
    a = ck["args"]
    _, _, _, X, H, _ = load_fold(data, ck["features"], ck["test_slice"], a["exclude"].split(","), ck.get("context"))
    tr, val = split_validation(len(X), a["val_frac"], a.get("val_seed", a.get("seed", 42)))
    return H[tr], X[tr], H[val], X[val]


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", required=True)
p.add_argument("--runs", nargs="+", required=True, help="train.py run folders (same fold)")
p.add_argument("--steps", default="1,5", help="step budgets K (comma-separated)")
p.add_argument("--samples", type=int, default=2)
p.add_argument("--temperatures", default="1", help="temperatures for distributional heads (comma-separated)")
p.add_argument("--csv", help="append one row per run, K and temperature to this file")
a = p.parse_args()

rows = []
for i, run_dir in enumerate(a.runs):
    net, diffusion, ck = load_run(os.path.join(run_dir, "best.pt"), torch.device("cpu"))
    Ht, Xt, Hv, Xv = validation_split(ck, a.data)
    z = lambda H: ((H - ck["feat_mean"]) / ck["feat_std"]).astype(np.float32)  # noqa: E731
    if i == 0:
        predict = fit_ridge(z(Ht), Xt, z(Hv), Xv, 0)[0]
        show("ridge (λ on this split)", scores(Xv, predict(z(Hv))[0]))
    temps = [0.0] if net.cfg.head == "point" else [float(t) for t in a.temperatures.split(",")]
    for K in map(int, a.steps.split(",")):
        for tau in temps:
            gen = torch.Generator().manual_seed(0)
            if net.cfg.spatial == "none":
                with torch.no_grad():
                    out = [generate(net, diffusion, h, K, a.samples, gen, temperature=tau)
                           for h in torch.from_numpy(z(Hv)).split(32)]
                smp = torch.cat([o[1] for o in out], 1).numpy()
            else:                                        # the validation spots among their neighbours, as kept
                smp = spatial_samples(net, diffusion, ck, K, a.samples, gen, tau)
                assert np.array_equal(ck["val_expr"], Xv), "a spatial run keeps every validation spot, in order"
            mean = smp.mean(0)
            m = scores(Xv, mean, smp.std(0, ddof=1) if a.samples > 1 else np.zeros_like(mean))
            label = (f"{os.path.basename(run_dir.rstrip('/'))} K={K}"
                     + (f" τ={tau:g}" if net.cfg.head != "point" else ""))
            show(label, m)
            rows.append({"run": run_dir, "head": net.cfg.head, "K": K, "temperature": tau, "n_val": len(Xv), **m})
if a.csv:
    import pandas as pd
    pd.DataFrame(rows).to_csv(a.csv, mode="a", header=not os.path.isfile(a.csv), index=False)
