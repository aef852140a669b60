"""Baselines on the same features and folds as HINGE, written as sample.py prediction files so
that evaluate.py scores them identically (README, "Quality benchmark").

    python baselines.py --data data/her2st --features stain --test-slice C2 --method ridge --out runs/q/ridge/pred

Methods, each fitted on the fold's training spots with its one hyper-parameter chosen by MSE on
the same 10 % validation spots that train.py holds out (seed 42); the test slice is read once,
to predict it. Each gives a predictive distribution too, written as `std` (and `samples`) the way
sample.py writes them, so that evaluate.py scores its uncertainty as the generative model's:
  mean   the training-mean expression of each gene (no hyper-parameter); std: the gene's training std
  ridge  linear regression on standardised features, penalty λ from a log grid; std: a Gaussian
         residual per gene, its variance the mean squared error on the validation spots
  mlp    an ST-Net-style regression head (one hidden layer) on the frozen features, the epoch
         count chosen by early stopping on validation; std: as ridge
  knn    BLEEP-style retrieval: the mean expression of the k training spots nearest in cosine
         similarity of the standardised features, k from a grid; the k neighbours are its samples,
         std their spread (--save-samples stores them)
With --context K each spot-level method above sees its spot's features followed by the mean
features of its K nearest spots (the same neighbourhood train.py builds).

The paper's slide-context peers (peers/) see whole slides, trained with early stopping on the
validation spots' MSE within each paper's epochs and patience (--epochs / --patience replace them):
  stflow   flow matching over the spatial graph of each slide (ICML 2025); generative: --samples
           draws from different priors give std (and samples)
  triplex  target, neighbour (5 x 5 tiles) and global (whole-slide transformer) branches fused by
           cross-attention (CVPR 2024); std: as ridge
  merge    a GAT over each slide's spatial and cluster graph of bottleneck features (CVPR 2025); std: as ridge
Every budget is counted in epochs, never in seconds, so a command gives the same predictions, bit for bit,
on an idle or a busy machine (at the same torch thread count). The papers' epochs fit a CPU, so no peer has
a CPU preset of epochs: on one core an epoch of a Her2ST fold (4 or 5 training slides) takes 4-7 s for
STFlow, 1.2-2.4 s for TRIPLEX (--size cpu) and 0.1-0.2 s for MERGE, at most 12, 8 and 1 minutes a fold.
--budget-s adds a wall-clock cap for a user in a hurry; it is off by default and no benchmark sets it.
"""
import argparse
import os
import time
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import peers as P
from common import UserError, atomic_h5, list_slices, read_slice, run
from folds import add_fold_args, feature_stats, fold_context, load_fold, open_features, split_validation
from predictions import PredictionFile, provenance, write_anndata
from scores import calibrate, calibration_scale

RIDGE_GRID = np.logspace(-2, 6, 17)                      # λ on standardised features: 0.01 .. 1e6, half-decade steps
KNN_GRID = [1, 2, 3, 5, 10, 20, 50, 100, 200]
CHUNK = 1024                                             # test spots per prediction step: memory stays flat


class Target(NamedTuple):
    """A slice to predict: its data folder, name and prediction file."""
    data: str
    name: str
    dst: str


def mse(a, b):
    return float(((a - b) ** 2).mean())


def gaussian(mean_of, std):
    """A predictor Q -> (mean, std, no samples) with one std per gene, the same at every spot."""
    return lambda Q: (mean_of(Q), np.repeat(std[None], len(Q), 0), None)


def validation_std(mean_of, Hv, Xv):
    """Per gene, the root mean squared error on the validation spots: the std of a Gaussian residual."""
    return np.sqrt(((mean_of(Hv) - Xv) ** 2).mean(0))


#################################################################################
#                                   Methods                                     #
#################################################################################

def fit_mean(H, X, Hv, Xv, seed):
    m = X.mean(0)
    return gaussian(lambda Q: np.repeat(m[None], len(Q), 0), X.std(0)), {}


def fit_ridge(H, X, Hv, Xv, seed):
    """Closed-form ridge for every λ of the grid from one SVD of the centred features."""
    hm, xm = H.mean(0), X.mean(0)
    U, s, Vt = np.linalg.svd(H - hm, full_matrices=False)
    UtX = U.T @ (X - xm)                                 # [r, G]

    def weights(lam):
        return Vt.T @ ((s / (s ** 2 + lam))[:, None] * UtX)  # [D, G]

    scores = [mse((Hv - hm) @ weights(lam) + xm, Xv) for lam in RIDGE_GRID]
    lam = float(RIDGE_GRID[int(np.argmin(scores))])
    W = weights(lam)

    def mean_of(Q):
        return (Q - hm) @ W + xm
    return gaussian(mean_of, validation_std(mean_of, Hv, Xv)), {"lambda": lam, "val_mse": min(scores),
                                                                 "on_grid_edge": lam in RIDGE_GRID[[0, -1]]}


def fit_knn(H, X, Hv, Xv, seed):
    ks = [k for k in KNN_GRID if k <= len(H)]

    def unit(A):
        return A / np.linalg.norm(A, axis=1, keepdims=True).clip(1e-8)
    ref = unit(H)

    def neighbours(Q, k):                                # -> [k, n, G]: expression of the k most similar training spots
        nn_idx = np.argpartition(-(unit(Q) @ ref.T), k - 1, axis=1)[:, :k]
        return X[nn_idx.T]

    def mean_of(Q, k):                                   # chunks keep the similarity matrix small
        return np.concatenate([neighbours(Q[s:s + CHUNK], k).mean(0) for s in range(0, len(Q), CHUNK)])

    scores = [mse(mean_of(Hv, k), Xv) for k in ks]
    k = ks[int(np.argmin(scores))]

    def predict(Q):                                      # spread as sample.py's: ddof 1 when there are several
        x = neighbours(Q, k)
        return x.mean(0), x.std(0, ddof=1 if k > 1 else 0), x
    return predict, {"k": k, "val_mse": min(scores), "on_grid_edge": k in (ks[0], ks[-1])}


def fit_mlp(H, X, Hv, Xv, seed, hidden=512, max_epochs=300, patience=20, batch=32):
    """ST-Net's head (anchors: a linear layer on a frozen image network) with one hidden layer;
    Adam 1e-3, batch 32, kept at the epoch of lowest validation MSE."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(H.shape[1], hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(hidden, X.shape[1]))
    with torch.no_grad():
        net[-1].bias.copy_(torch.from_numpy(X.mean(0)))  # start at the training mean
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Ht, Xt, Hvt = map(torch.from_numpy, (H, X, Hv))
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = float("inf"), None, 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        for b in torch.randperm(len(Ht), generator=gen).split(batch):
            loss = ((net(Ht[b]) - Xt[b]) ** 2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
        net.eval()
        with torch.no_grad():
            v = mse(net(Hvt).numpy(), Xv)
        if v < best:
            best, best_epoch = v, epoch
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    net.load_state_dict(best_state)
    net.eval()

    def mean_of(Q):
        with torch.no_grad():
            return net(torch.from_numpy(Q)).numpy()
    return gaussian(mean_of, validation_std(mean_of, Hv, Xv)), {"epochs": best_epoch, "val_mse": best}


# each: (H, X, Hv, Xv, seed) -> (predict: features [n, D] -> (mean [n, G], std [n, G], samples [S, n, G] or None),
#                               the chosen hyper-parameters)
METHODS = {"mean": fit_mean, "ridge": fit_ridge, "mlp": fit_mlp, "knn": fit_knn}


#################################################################################
#                                     Main                                      #
#################################################################################

def run_peer(a, targets, encoders):
    """A slide-context peer: fit on the fold's whole slides, predict each target slide whole
    -> (chosen, train slices)."""
    dev = torch.device(a.device)
    slides, genes, mu, sd = P.fold_slides(a.data, encoders, a.test_slice, a.exclude.split(","), a.val_frac, a.val_seed,
                                          dev)
    predict, chosen = P.fit(P.PEERS[a.method], slides, len(genes), a, dev)
    scale = None
    if a.calibrate:                                      # the validation spots of the training slides, predicted whole
        val = [(predict(s), s.val.cpu().numpy(), s.expr[s.val].cpu().numpy()) for s in slides if s.val.any()]
        scale = calibration_scale(np.concatenate([x for _, _, x in val]), np.concatenate([p[0][v] for p, v, _ in val]),
                                  np.concatenate([p[1][v] for p, v, _ in val]))
    for t in targets:
        mean, std, samples = predict(P.load_slide(t.data, encoders, t.name, mu, sd, dev))
        if scale is not None:
            std, samples = calibrate(mean, std, samples, scale)
        N, G = mean.shape
        with atomic_h5(t.dst) as f:
            out = PredictionFile(f, N, G, CHUNK, len(samples) if a.save_samples else 0)
            out.write(0, mean, std, samples)
            finish(out, a, t, genes, [s.name for s in slides], chosen, N, scale)
    spots = f"{sum(int(s.target.sum()) for s in slides)} train / {sum(int(s.val.sum()) for s in slides)} val spots"
    return chosen, spots, len(slides)


def finish(out, a, target, genes, names, chosen, N, scale):
    """Spot ids, genes, the calibration and the run's settings, once every row is written."""
    secs = time.time() - a.t0
    if scale is not None:
        out.f["calibration_scale"] = scale.astype(np.float32)
    out.finish(read_slice(target.data, target.name, ("barcode",))["barcode"], [g.decode() for g in genes],
               method=a.method, calibrated=scale is not None, seconds=secs, spots_per_s=N / secs,
               train_slices=",".join(names), **({"context": a.context} if a.context else {}), **chosen,
               **provenance(target.data, target.name, {"data": a.data, "slices": names}))


def report(a, targets, chosen, spots, n_slides):
    for t in targets:
        write_anndata(t.dst, t.data)
    secs = time.time() - a.t0
    picked = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen.items())
    print(f"{a.method}: {spots} from {n_slides} slices; {picked or 'nothing to choose'}; "
          + "; ".join(f"{t.name} -> {t.dst}" for t in targets) + f" ({secs:.1f}s)")
    if chosen.get("on_grid_edge"):
        print("note: the chosen value lies on the edge of the search grid; the optimum may lie beyond it")


def main():
    peers = ", ".join(P.PEERS)                           # help from the registry: a new peer edits nothing here
    drawn = ", ".join(m for m, c in P.PEERS.items() if c.GENERATIVE)
    epochs, patience = (", ".join(f"{m} {getattr(c, k)}" for m, c in P.PEERS.items()) for k in ("EPOCHS", "PATIENCE"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold_args(p)                                     # the same fold and validation split as train.py
    p.add_argument("--seed", type=int, default=42, help="seed of the MLP's and the peers' initialisation and batch "
                                                        "order (default 42)")
    p.add_argument("--method", required=True, choices=list(METHODS) + list(P.PEERS),
                   help=f"mean, ridge, mlp, knn, or a slide-context peer: {peers} (see above)")
    p.add_argument("--out", required=True, help="prediction folder: writes <out>/<test slice>.h5")
    p.add_argument("--predict-data", metavar="DIR", help="predict every slice of this prepared folder instead of the "
                                                        "test slice, e.g. a slide without spatial data "
                                                        "(prepare_data.py --dataset image, features from "
                                                        "extract_features.py)")
    p.add_argument("--save-samples", action="store_true", help="knn: also store the k neighbours' expression as "
                                                               "`samples` float16 [k, N, G], as sample.py does; "
                                                               f"{drawn}: its --samples draws")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="keep the raw spread (default: scaled per gene so that the 50 %% and 90 %% intervals cover "
                        "their share of the validation spots, the rule sample.py applies)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prediction file")
    g = p.add_argument_group(f"slide-context peers ({peers})")
    g.add_argument("--epochs", type=int, help=f"at most this many epochs (default each paper's: {epochs})")
    g.add_argument("--patience", type=int, help="early stop after this many epochs without a lower validation MSE "
                                                f"(default {patience})")
    g.add_argument("--budget-s", type=float, default=0,
                   help="also stop training after the epoch that passes this many seconds, keeping the best epoch "
                        "(default 0: no wall-clock cap). A cap that binds makes the result depend on the machine's "
                        "speed and load; lower --epochs instead for a shorter run that is reproducible")
    g.add_argument("--size", choices=["paper", "cpu"], help="model widths: each paper's (default on a GPU) or reduced "
                                                            "for CPUs (default on a CPU; TRIPLEX and MERGE only)")
    g.add_argument("--samples", type=int, default=5, help=f"{drawn}: samples per spot (different priors); their mean "
                                                          "is the prediction, their spread its std (default 5)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a = p.parse_args()

    names = list_slices(a.predict_data) if a.predict_data else [a.test_slice]
    targets = [Target(a.predict_data or a.data, n, os.path.join(a.out, f"{n}.h5")) for n in names]
    for t in targets:
        if os.path.isfile(t.dst) and not a.overwrite:
            raise UserError(f"{t.dst} exists; pass --overwrite to replace it or choose another --out")
    if a.save_samples and not (a.method == "knn" or a.method in P.PEERS and P.PEERS[a.method].GENERATIVE):
        raise UserError(f"--save-samples: only knn (its neighbours) and {drawn} (its draws) have samples; {a.method}'s "
                        "distribution is the Gaussian pred ± std it writes anyway")
    if a.method in P.PEERS and a.context:
        raise UserError(f"--context: {a.method} sees each spot's neighbourhood itself; --context is for the spot-level "
                        "methods (mean, ridge, mlp, knn) and train.py")
    if a.samples < 1:
        raise UserError(f"--samples {a.samples}: at least one sample per spot")
    a.size = a.size or ("paper" if a.device.startswith("cuda") else "cpu")
    a.t0 = time.time()
    encoders = a.features.split(",")
    if a.method in P.PEERS:
        return report(a, targets, *run_peer(a, targets, encoders))
    context = fold_context(a.data, encoders, a.test_slice, a.exclude.split(","), a.context)
    train_names, genes, _, X, H, _ = load_fold(a.data, encoders, a.test_slice, a.exclude.split(","), context)
    tr, val = split_validation(len(X), a.val_frac, a.val_seed)
    if len(tr) < 2:
        raise UserError(f"only {len(X)} training spots with expression in {a.data}: too few to fit and validate")
    mu, sd = feature_stats(H)                            # standardised with training statistics, as train.py
    H = ((H - mu) / sd).astype(np.float32)
    predict, chosen = METHODS[a.method](H[tr], X[tr], H[val], X[val], a.seed)
    scale = None
    if a.calibrate:                                      # one rule for every method: the spread fitted to validation
        scale = calibration_scale(X[val], *predict(H[val])[:2])

    for t in targets:
        feats = open_features(t.data, encoders, t.name, context)
        N, G = feats.n, X.shape[1]
        with atomic_h5(t.dst) as f:
            out = PredictionFile(f, N, G, CHUNK, chosen["k"] if a.save_samples else 0)  # knn's samples: k neighbours
            for s in tqdm(range(0, N, CHUNK), desc=f"predict {t.name}", unit="chunk"):
                mean, std, samples = predict(((feats.read(s, s + CHUNK) - mu) / sd).astype(np.float32))
                if scale is not None:
                    std, samples = calibrate(mean, std, samples, scale)
                out.write(s, mean, std, samples)
            finish(out, a, t, genes, train_names, chosen, N, scale)
        feats.close()
    report(a, targets, chosen, f"{len(tr)} train / {len(val)} val spots", len(train_names))


if __name__ == "__main__":
    run(main)
