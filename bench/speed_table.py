"""The paper's Table S5 on this machine: speed and memory of every method at 1k, 10k and 50k spots.

    python bench/speed_table.py                          # 1k, 10k, 50k spots; on a CPU the `tiny` HINGE backbone
    python bench/speed_table.py --sizes 1000,10000       # the quick run: 15 minutes on 2 shared CPU cores
    python bench/speed_table.py --preset cellfm-800m     # on a GPU: the paper's backbone, peers at their papers' sizes

Each size gets a synthetic data folder: a training slide and a test slide of N spots on a square
grid (100 µm pitch), random features (speed does not depend on their values; --dim 1536 = UNI +
CONCH) and random expression of --genes genes. Each (method, size) runs in its own process, which
  1. builds the method: the HINGE variants with random weights (as bench/wsi_bench.py), the
     baselines fitted and the peers built on the 1k-spot training slide (knn's reference set is
     those spots);
  2. predicts the N-spot test slide as the method's command does (HINGE in batches of --batch-size
     spots, K steps, S = 1; the baselines in chunks; a peer the whole slide at once, one sample), and
     reports the time, spots/s and its peak resident memory (VmHWM, reset through
     /proc/self/clear_refs once the method is built: the fit on 1k spots does not count, the
     interpreter and the model do; predictions are kept in memory only where the method holds the
     whole slide);
  3. trains on the N-spot training slide: seconds per epoch, timed over --train-steps optimiser steps
     after a warm-up step and scaled to the steps of one epoch (ridge, knn: the closed-form fit or the
     choice of k; MLP: one epoch). HINGE K = 1, 5, 50 share one training (K is a sampling choice).
A process that runs out of memory (or past --mem-gb) is reported as OOM, one that passes --limit-s
as a timeout. HINGE's spots are independent of each other, so a HINGE prediction stops after
--sample-s seconds and its slide time is extrapolated from its spots/s (marked ~). Ratios are
to HINGE K = 5 at the same size; the last lines give each method's peak memory at the largest size
over the smallest (the whole-slide peers grow with N; the spot-level methods should not).
"""
import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FIT_SPOTS = 1000                                         # the training slide the methods are built on before predicting
ENCODER = "synthetic"
ROWS = [("HINGE K=1", "hinge", dict(variant="hinge", objective="masked", K=1)),
        ("HINGE K=5", "hinge", dict(variant="hinge", objective="masked", K=5)),
        ("HINGE K=50", "hinge", dict(variant="hinge", objective="masked", K=50)),
        ("Gauss-Diff K=5", "hinge", dict(variant="hinge", objective="gaussian", K=5)),
        ("scratch K=5", "hinge", dict(variant="scratch", objective="masked", K=5)),
        ("ridge", "baseline", dict(name="ridge")), ("MLP", "baseline", dict(name="mlp")),
        ("kNN", "baseline", dict(name="knn")),
        ("STFlow", "peer", dict(name="stflow")), ("TRIPLEX", "peer", dict(name="triplex")),
        ("MERGE", "peer", dict(name="merge"))]


#################################################################################
#                                Synthetic slides                               #
#################################################################################

def make_data(root, n, dim, genes, seed=0):
    """<root>/slices/{train,test}.h5 and their features: n spots each on a square grid, 100 µm pitch."""
    if os.path.isfile(os.path.join(root, "slices.tsv")):
        return root
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(n))
    array = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int32)
    for d in ("slices", os.path.join("features", ENCODER)):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for name in ("train", "test"):
        barcode = np.array([f"{c}x{r}".encode() for c, r in array])
        expr = np.log2(1 + rng.poisson(2.0, (n, genes))).astype(np.float32)
        with h5py.File(os.path.join(root, "slices", f"{name}.h5"), "w") as s:
            s["barcode"], s["array"] = barcode, array
            s["pixel"] = (array * 100.0 + rng.normal(0, 1.5, array.shape)).astype(np.float32)
            s["expr"], s["counts"] = expr, (2 ** expr - 1).astype(np.float32)
            s["genes"], s["gene_ids"] = np.array([f"G{i}".encode() for i in range(genes)]), np.zeros(genes, np.int64)
            s.attrs.update(pixel_size_um=1.0, patch_px_native=224, slice=name, dataset="speed")
        with h5py.File(os.path.join(root, "features", ENCODER, f"{name}.h5"), "w") as f:
            f["barcode"] = barcode
            e = f.create_dataset("embeddings", (n, dim), np.float32)
            for s in range(0, n, 8192):
                e[s:s + 8192] = rng.standard_normal((min(8192, n - s), dim), dtype=np.float32)
    with open(os.path.join(root, "slices.tsv"), "w") as f:
        f.write("slice\tpatient\ntrain\tP1\ntest\tP2\n")
    return root


#################################################################################
#                        One measurement (child process)                        #
#################################################################################

def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_peak():
    """From here on VmHWM starts at the current resident size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def timed_steps(steps, n):
    """Seconds per step over n steps after one warm-up step."""
    next(steps)
    t0 = time.perf_counter()
    for _ in range(n):
        next(steps)
    return (time.perf_counter() - t0) / n


def hinge_model(a, kind, G, D, dev):
    import model as M
    from checkpoints import gene_tokens
    from diffusion import make_diffusion
    tokens, vocab = gene_tokens(np.zeros(G), M.make_config(a.preset).vocab)
    net = M.Hinge(M.make_config(a.preset, vocab=vocab, n_genes=G, hist_dim=D), tokens).to(dev)
    M.set_trainable(net, kind["variant"])
    return net, make_diffusion(kind["objective"], G, 50)


def measure_hinge(a, kind, data, dev):
    import torch
    from common import read_slice
    from diffusion import generate
    from folds import Features
    feats = Features(data, [ENCODER], "test")
    G = len(read_slice(data, "test", ("genes",))["genes"])
    net, diffusion = hinge_model(a, kind, G, feats.dim, dev)
    net.eval()
    gen = torch.Generator(dev).manual_seed(0)
    reset_peak()
    t0, done, N = time.perf_counter(), 0, feats.n
    with torch.no_grad():
        for b in range(0, N, a.batch_size):             # sample.py's loop; its rows go to disk, here they are dropped
            generate(net, diffusion, torch.from_numpy(feats.read(b, b + a.batch_size)).to(dev), kind["K"], 1, gen)
            done = min(N, b + a.batch_size)
            if time.perf_counter() - t0 > a.sample_s and done < N:
                break
    out = {"seconds": (time.perf_counter() - t0) * N / done, "extrapolated": done < N, "peak_mib": peak_mib()}
    if a.train and kind["K"] == 5:
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        train = Features(data, [ENCODER], "train").read()
        X = read_slice(data, "train")["expr"]
        rng = np.random.default_rng(0)

        def steps():                                     # train.py's step: the diffusion loss, clip 1.0, AdamW
            while True:
                b = rng.choice(len(X), min(32, len(X)), replace=False)
                h = torch.from_numpy(train[b]).to(dev)
                loss = diffusion.loss(net, torch.from_numpy(X[b]).to(dev), net.embed_histology(h))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                yield
        out["epoch_s"] = timed_steps(steps(), a.train_steps) * math.ceil(0.9 * len(X) / 32)
    return out


def measure_baseline(a, kind, data, fit_data, dev):
    import baselines as B
    from folds import Features, feature_stats, load_fold, split_validation

    def fold(d):
        _, _, _, X, H, _ = load_fold(d, [ENCODER], "test")
        tr, val = split_validation(len(X))
        mu, sd = feature_stats(H)
        H = ((H - mu) / sd).astype(np.float32)
        return H[tr], X[tr], H[val], X[val], mu, sd

    fit = B.METHODS[kind["name"]]
    if kind["name"] == "mlp":                            # one epoch: speed does not depend on the weights
        fit = lambda *args: B.fit_mlp(*args, max_epochs=1)  # noqa: E731
    Ht, Xt, Hv, Xv, mu, sd = fold(fit_data)
    predict, _ = fit(Ht, Xt, Hv, Xv, 0)
    reset_peak()
    t0 = time.perf_counter()
    feats = Features(data, [ENCODER], "test")
    for s in range(0, feats.n, B.CHUNK):                 # baselines.py's loop; its rows go to disk, here dropped
        predict(((feats.read(s, s + B.CHUNK) - mu) / sd).astype(np.float32))
    out = {"seconds": time.perf_counter() - t0, "peak_mib": peak_mib()}
    if a.train:
        Ht, Xt, Hv, Xv, _, _ = fold(data)
        t0 = time.perf_counter()
        fit(Ht, Xt, Hv, Xv, 0)
        out["epoch_s"] = time.perf_counter() - t0
    return out


def measure_peer(a, kind, data, fit_data, dev):
    import peers as P
    settings = SimpleNamespace(seed=0, size=a.size, budget_s=10, samples=1, epochs=1, patience=1)

    def build(d):
        slides, genes, mu, sd = P.fold_slides(d, [ENCODER], "test", [], 0.1, 42, dev)
        return P.PEERS[kind["name"]](slides, len(genes), settings, dev), mu, sd

    peer, mu, sd = build(fit_data)
    peer.net.eval()
    reset_peak()
    t0 = time.perf_counter()
    peer.predict(P.load_slide(data, [ENCODER], "test", mu, sd, dev), 1)
    out = {"seconds": time.perf_counter() - t0, "peak_mib": peak_mib()}
    if a.train:
        peer, _, _ = build(data)
        peer.net.train()
        steps = itertools.chain.from_iterable(peer.steps() for _ in itertools.count())   # epoch after epoch
        out["epoch_s"] = timed_steps(steps, a.train_steps) * peer.n_steps
    return out


def child(spec):
    a = SimpleNamespace(**spec["args"])
    if not a.device.startswith("cuda"):                 # (CUDA maps far more address space than it uses)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (int(a.mem_gb * 2 ** 30), hard))   # OOM as an error, not the OOM killer
    import torch
    dev = torch.device(a.device)
    try:
        if spec["family"] == "hinge":
            out = measure_hinge(a, spec["kind"], spec["data"], dev)
        elif spec["family"] == "baseline":
            out = measure_baseline(a, spec["kind"], spec["data"], spec["fit_data"], dev)
        else:
            out = measure_peer(a, spec["kind"], spec["data"], spec["fit_data"], dev)
    except (MemoryError, torch.OutOfMemoryError) as e:
        out = {"oom": str(e)[:200]}
    except RuntimeError as e:                            # torch reports a failed CPU allocation as a RuntimeError
        if "alloc" not in str(e) and "memory" not in str(e):
            raise
        out = {"oom": str(e)[:200]}
    print("RESULT " + json.dumps(out), flush=True)


def run_child(spec, limit_s):
    """-> the child's result dict, {"oom": ...} or {"timeout": True}."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"timeout": True}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == -9:                            # killed by the kernel's OOM killer
        return {"oom": "killed"}
    if proc.returncode or not lines:
        raise SystemExit(f"{spec['row']} at {spec['size']} spots failed ({proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


#################################################################################
#                                     Table                                     #
#################################################################################

def cell(r, key, fmt):
    if "oom" in r:
        return "OOM"
    if "timeout" in r:
        return "timeout"
    if key not in r:
        return "-"
    return ("~" if key == "seconds" and r.get("extrapolated") else "") + fmt.format(r[key])


def rate(r, n):
    return f"{n / r['seconds']:.0f}" if "seconds" in r else cell(r, "seconds", "")


def ratio(r, ref, key):
    return f"{r[key] / ref[key]:.3g}x" if key in r and key in ref else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,50000", help="spots per slide (default 1000,10000,50000)")
    p.add_argument("--methods", help="rows to run, comma-separated names as in the table (default all)")
    p.add_argument("--dim", type=int, default=1536, help="feature dimension (default 1536 = UNI + CONCH)")
    p.add_argument("--genes", type=int, default=300, help="genes (default 300)")
    p.add_argument("--preset", help="HINGE backbone (default tiny on a CPU, cellfm-800m on a GPU)")
    p.add_argument("--size", choices=["paper", "cpu"], help="peer widths (default cpu on a CPU, paper on a GPU)")
    p.add_argument("--batch-size", type=int, help="HINGE spots per batch (sample.py's default: 32 CPU, 256 GPU)")
    p.add_argument("--train-steps", type=int, default=3,
                   help="optimiser steps timed per training measurement (default 3)")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training column")
    p.add_argument("--limit-s", type=float, default=1800,
                   help="seconds per measurement before it is a timeout (default 1800: TRIPLEX's 50k-spot build, "
                        "prediction and training steps take 5-20 min on 2 CPU cores)")
    p.add_argument("--sample-s", type=float, default=20,
                   help="HINGE predictions stop after this many seconds; the slide time is extrapolated from their "
                        "spots/s (default 20)")
    p.add_argument("--mem-gb", type=float, default=16,
                   help="address-space cap per measurement on a CPU, GiB (default 16; importing torch alone maps "
                        "about 3.5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda when present)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "speed_table"), help="folder for the synthetic slides")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    import torch
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = a.device.startswith("cuda")
    a.preset, a.size = a.preset or ("cellfm-800m" if gpu else "tiny"), a.size or ("paper" if gpu else "cpu")
    a.batch_size = a.batch_size or (256 if gpu else 32)
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = [r for r in ROWS if not a.methods or r[0] in a.methods.split(",")]
    fit_data = make_data(os.path.join(a.out, f"n{FIT_SPOTS}"), FIT_SPOTS, a.dim, a.genes)
    args = {k: getattr(a, k) for k in ("preset", "size", "batch_size", "train_steps", "train", "sample_s", "mem_gb",
                                       "device")}
    print(f"device {a.device} ({os.cpu_count()} cores), HINGE preset {a.preset}, peers {a.size}-size, "
          f"{a.dim}-d features, {a.genes} genes, S = 1, methods built on {FIT_SPOTS} spots", flush=True)
    results = {}
    for n in sizes:
        data = make_data(os.path.join(a.out, f"n{n}"), n, a.dim, a.genes)
        for name, family, kind in rows:
            t0 = time.time()
            spec = {"row": name, "size": n, "family": family, "kind": kind, "data": data, "fit_data": fit_data,
                    "args": args}
            r = results[name, n] = run_child(spec, a.limit_s)
            print(f"  {name:<15} {n:>6} spots: {json.dumps(r)} ({time.time() - t0:.0f} s)", flush=True)
        for k in ("HINGE K=1", "HINGE K=50"):          # K is a sampling choice: one training for the three
            if (k, n) in results and ("HINGE K=5", n) in results and "epoch_s" in results["HINGE K=5", n]:
                results[k, n]["epoch_s"] = results["HINGE K=5", n]["epoch_s"]

    for n in sizes:
        ref = results.get(("HINGE K=5", n), {})
        print(f"\n{n} spots per slide")
        print(f"{'method':<16}{'s / slide':>11}{'spots/s':>10}{'peak MiB':>10}{'train s/epoch':>15}"
              f"{'time / HINGE K=5':>18}{'MiB / HINGE K=5':>17}")
        for name, _, _ in rows:
            r = results[name, n]
            print(f"{name:<16}{cell(r, 'seconds', '{:.2f}'):>11}{rate(r, n):>10}{cell(r, 'peak_mib', '{:.0f}'):>10}"
                  f"{cell(r, 'epoch_s', '{:.1f}'):>15}{ratio(r, ref, 'seconds'):>18}{ratio(r, ref, 'peak_mib'):>17}")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\npeak memory at {hi} spots / at {lo} spots:")
        for name, _, _ in rows:
            r0, r1 = results[name, lo], results[name, hi]
            print(f"  {name:<16}" + (f"{r1['peak_mib'] / r0['peak_mib']:.2f}x" if "peak_mib" in r0 and "peak_mib" in r1
                                     else cell(r1, "peak_mib", "")))


if __name__ == "__main__":
    main()
