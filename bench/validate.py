"""Generation quality of trained runs on their own validation spots: the diagnostic for choosing
between HINGE settings without touching the test slice (README "Quality benchmark").

    python bench/validate.py --data runs/quality/data --runs runs/quality/C2/hinge runs/quality/C2/scratch --steps 1,5

For each run: rebuilds the fold's 10 % validation split exactly as train.py drew it, generates
those spots at each K and prints mean r, PCC-50, MSE and the spread ratio (std of the
prediction over std of the truth, averaged over genes: 1 = as variable as the truth, 0 = one
value for every spot). A ridge line on the same split gives a reference.
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from baselines import fit_ridge  # noqa: E402
from common import load_fold, split_validation  # noqa: E402
from evaluate import pearson_per_gene, top_k_mean  # noqa: E402
from sample import load_run  # noqa: E402


def scores(truth, pred):
    r = pearson_per_gene(truth, pred)
    spread = np.mean(pred.std(0) / truth.std(0).clip(1e-8))
    return (f"mean r {np.nanmean(r):.3f}  PCC-50 {top_k_mean(r, 50):.3f}  MSE {((truth - pred) ** 2).mean():.3f}  "
            f"gene-bias² {((pred - truth).mean(0) ** 2).mean():.3f}  spread {spread:.2f}")


def validation_split(ck, data):
    a = ck["args"]
    _, _, _, X, H, _ = load_fold(data, ck["features"], ck["test_slice"], a["exclude"].split(","), ck.get("context"))
    tr, val = split_validation(len(X), a["val_frac"], a["seed"])
    H = ((H - ck["feat_mean"]) / ck["feat_std"]).astype(np.float32)
    return H[tr], X[tr], H[val], X[val]


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", required=True)
p.add_argument("--runs", nargs="+", required=True, help="train.py run folders (same fold)")
p.add_argument("--steps", default="1,5", help="step budgets K (comma-separated)")
p.add_argument("--samples", type=int, default=2)
a = p.parse_args()

torch.manual_seed(0)
for i, run_dir in enumerate(a.runs):
    net, diffusion, ck = load_run(os.path.join(run_dir, "best.pt"), torch.device("cpu"))
    Ht, Xt, Hv, Xv = validation_split(ck, a.data)
    if i == 0:
        print(f"{'ridge (λ on this split)':<40} {scores(Xv, fit_ridge(Ht, Xt, Hv, Xv, 0)[0](Hv)[0])}")
    for K in map(int, a.steps.split(",")):
        gen = torch.Generator().manual_seed(0)
        pred = torch.cat([M.generate(net, diffusion, h, K, a.samples, gen)[0] for h in torch.from_numpy(Hv).split(32)])
        print(f"{os.path.basename(run_dir.rstrip('/')) + f' K={K}':<40} {scores(Xv, pred.numpy())}")
