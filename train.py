"""Stage 3: train HINGE on all slices but the held-out one (the paper's protocol; README "Stages").

    python train.py --data data/demo --features stain --test-slice demo1 \
        --backbone-ckpt backbone.safetensors --out runs/demo1
    python train.py ... --backbone-ckpt scGPT_human/     # HINGE on scGPT: its folder (best_model.pt, ...)
    torchrun --nproc_per_node 4 train.py ...            # DDP, no code change (NCCL on GPU, gloo on CPU)

Writes <out>/best.pt (lowest validation MSE), <out>/last.pt (every epoch, for --resume) and
<out>/log.csv. Defaults are the paper's protocol: AdamW 1e-4, batch 32, MultiStepLR [20, 30]
x0.2, at most 50 epochs, early stop after 5 epochs without improvement once 15 have passed,
a 5-epoch curriculum at <= 20 % hidden genes, T = 50.
"""
import argparse
import csv
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
from checkpoints import build_model, load_backbone, prepare_backbone, read_run, save_run
from common import UserError, run
from diffusion import Chunk, make_diffusion
from folds import (add_fold_args, feature_stats, fold_context, fold_space, load_fold, renumber, split_validation,
                   sub_space, training_pixel_size)
from runtime import add_runtime_args, init_distributed


CALIBRATION_SPOTS = 2000                                 # validation spots kept in the run (all of a Her2ST fold's)
SPATIAL = ("none", "neighbourhood", "slide", "joint")


def check_spatial(a, world):
    """--spatial against the other flags, before any data is read."""
    if a.spatial == "none":
        return
    if a.context:
        raise UserError(f"--spatial {a.spatial} reads the neighbourhood by attention; drop --context {a.context}")
    if a.neighbours < 1:
        raise UserError(f"--neighbours {a.neighbours}: the spatial radius needs at least one neighbour")
    if a.spatial == "joint" and a.objective != "masked":
        raise UserError("--spatial joint shares revealed genes between neighbours: masked diffusion only")
    if a.spatial == "joint" and world > 1:
        raise UserError("--spatial joint trains on patches of a slide in one process; run it without torchrun")


def calibration_space(space, val_rows):
    """The validation spots a spatial run keeps, with their neighbours, as a SlideSpace's arrays (features float16,
    to keep the run small): sample.py calibrates the spread on them, generated as a slide. scored: where the
    validation spots are among the rows, in the order of val_expr."""
    nb = space.neighbours.idx[val_rows]
    pool = np.union1d(val_rows, nb[nb >= 0])
    sub = sub_space(space, pool)
    return {"features": sub.features.astype(np.float16), **sub.neighbours._asdict(), "means": sub.means,
            "slide": sub.slide, "scored": np.searchsorted(pool, val_rows)}


def patch(centre, idx, allowed, size):
    """A patch of a slide (--spatial joint): `centre` and the allowed spots nearest it, breadth first over the
    neighbour table idx [N_all, M] -> at most `size` rows (a slide's allowed spots may be fewer)."""
    taken, seen, frontier = [centre], {centre}, [centre]
    while frontier and len(taken) < size:
        nxt = []
        for r in frontier:
            for q in idx[r][idx[r] >= 0]:
                if q not in seen:
                    seen.add(q)
                    nxt.append(q)
                    if allowed[q]:
                        taken.append(q)
        frontier = nxt
    return np.array(taken[:size])


def patch_neighbours(rows, idx, weight, count, n_all):
    """Where each patch row's neighbours lie among the patch's rows -> (pos [n, M], -1 outside; weight; count)."""
    pos = renumber(idx, rows, n_all)
    return pos, np.where(pos >= 0, weight[rows], 0), count[rows]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold_args(p)
    p.add_argument("--out", required=True, help="run folder for best.pt, last.pt and log.csv")
    p.add_argument("--preset", choices=list(M.PRESETS),
                   help="backbone and size (default small; scgpt when --backbone-ckpt is an scGPT folder, whose "
                        "args.json and tensors then set the size)")
    p.add_argument("--backbone-ckpt", "--cellfm-ckpt", dest="backbone_ckpt",
                   help="backbone weights: a CellFM file (.ckpt/.pt/.safetensors, official or from pretrain.py) or an "
                        "scGPT folder (best_model.pt, args.json, vocab.json; official or from pretrain.py); through "
                        "the Hugging Face cache with hf-hub:<owner>/<name> (an scGPT folder) or "
                        "hf-hub:<owner>/<name>/<file>")
    p.add_argument("--variant", default="hinge", choices=M.VARIANTS,
                   help="hinge: frozen backbone, conditioning trains; scratch: random backbone, all trains; "
                        "decoder-tune: + value decoder; backbone-lora: + LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank for --variant backbone-lora (default 8)")
    p.add_argument("--objective", default="masked", choices=["masked", "gaussian"],
                   help="masked diffusion or Gauss-Diff ablation")
    p.add_argument("--head", choices=["point", "gaussian", "beta-nll", "bins"],
                   help="the value of a revealed gene: gaussian (default: a mean and a variance per gene, NLL; "
                        "beta-nll: the same trained with β-NLL, β = 0.5), bins "
                        "(a categorical over bins of log2(count + 1), cross-entropy) or point (the official decoder, "
                        "MSE; Gauss-Diff's only head); sample.py draws from it")
    p.add_argument("--cond", default="softadaln", choices=["softadaln", "hist-affine-ln"],
                   help="how histology enters the blocks")
    p.add_argument("--gate", default="sigmoid", choices=["sigmoid", "residual"],
                   help="SoftAdaLN's gate: sigmoid(g), starting at sigmoid(6) (the official code; default) or 1 + g")
    p.add_argument("--init", default="official", choices=["official", "cellfm"],
                   help="random weights (scratch, LoRA, conditioning): the official code's xavier_uniform on every "
                        "Linear (default) or CellFM's (DeepNorm gains, LoRA B = 0, conditioning N(0, 0.02))")
    p.add_argument("--no-soft-norm", action="store_true", help="ablation: plain LayerNorm instead of SoftNorm")
    p.add_argument("--no-id-init", action="store_true",
                   help="ablation: default init of the modulation (no identity start)")
    p.add_argument("--schedule", default="poly-auto", help="poly-auto (ζ = log_T G), linear, cosine or power:<ζ>")
    p.add_argument("--mask-ratio", default="schedule", choices=["schedule", "uniform"],
                   help="uniform = RandMask ablation: hidden share ~ U(0,1), loss on all hidden genes")
    p.add_argument("--fill", default="gauss", choices=["gauss", "zero"],
                   help="value of hidden genes: N(0,1) noise or 0")
    p.add_argument("--loss-norm", default="sample", choices=["sample", "batch"],
                   help="average the revealed genes per sample (default: every step t weighs the same) or over "
                        "the whole batch (the official code)")
    p.add_argument("--spatial", default="none", choices=SPATIAL,
                   help="what of its slide a spot reads: none (its own patch, the paper's), neighbourhood (its "
                        "features attend over its neighbours', offsets encoded; replaces --context), slide (and the "
                        "slide's mean features), joint (and, at each step, what its neighbours have revealed: "
                        "sample.py then generates a slide in lockstep); radius from --neighbours")
    p.add_argument("--neighbours", type=int, default=8, metavar="K",
                   help="--spatial radius: the distance that K nearest spots cover on the training slides, in µm "
                        "(spot pitches where a slide has no pixel size) (default 8)")
    p.add_argument("--T", type=int, default=50, help="diffusion steps (default 50)")
    p.add_argument("--epochs", type=int, default=50, help="at most this many epochs (default 50)")
    p.add_argument("--dropout", type=float,
                   help="backbone dropout (default the preset's: CellFM's 0.1, scaled by depth)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--milestones", default="20,30", help="MultiStepLR epochs, x0.2 each (default 20,30)")
    p.add_argument("--patience", type=int, default=5, help="early stop after this many epochs without improvement")
    p.add_argument("--warmup", type=int, default=15, help="no early stop before this epoch (default 15)")
    p.add_argument("--curriculum-epochs", type=int, default=5,
                   help="epochs restricted to <= 20 %% hidden genes (0 = NoCurr)")
    add_runtime_args(p, 32, "spots per optimiser step over all processes (default 32, the paper's global batch; "
                            "under torchrun each process takes its share)", seed=42)
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    return p.parse_args()


def main():
    a = parse_args()
    rank, world, a.device = init_distributed(a.device)
    check_spatial(a, world)
    ddp = world > 1
    dev = torch.device(a.device)
    torch.manual_seed(a.seed); np.random.seed(a.seed); random.seed(a.seed)
    encoders = a.features.split(",")
    if a.variant == "hinge" and not a.backbone_ckpt:
        raise UserError("--variant hinge freezes the backbone, so it needs --backbone-ckpt (official CellFM or scGPT "
                        "weights, or pretrain.py output); or use --variant scratch")
    # gaussian: the lowest validation CRPS at no loss of PCC-50 or MSE (docs/results.md "Choosing the head")
    a.head = a.head or ("point" if a.objective == "gaussian" else "gaussian")
    if a.objective == "gaussian" and a.head != "point":
        raise UserError(f"--head {a.head}: Gauss-Diff (--objective gaussian) denoises values with the point head")
    if a.variant == "scratch" and a.backbone_ckpt:
        raise UserError("--variant scratch trains the backbone from random weights; drop --backbone-ckpt")

    context = fold_context(a.data, encoders, a.test_slice, a.exclude.split(","), a.context)
    train_names, genes, gene_ids, X, H, A = load_fold(a.data, encoders, a.test_slice, a.exclude.split(","), context)
    G, D = X.shape[1], H.shape[1]
    mu, sd = feature_stats(H)                            # features standardised with training statistics
    H = (H - mu) / sd
    A = (A - mu) / sd if A is not None else None
    tr_idx, val_idx = split_validation(len(X), a.val_frac, a.val_seed)
    radius, space = None, None
    if a.spatial != "none":                              # every spot of the training slides, kept or not
        radius = fold_context(a.data, encoders, a.test_slice, a.exclude.split(","), a.neighbours)
        space, kept = fold_space(a.data, train_names, encoders, radius)
        rows = np.flatnonzero(kept)                      # the fold-space row of each of X's spots
        kept_at = np.full(len(kept), -1)
        kept_at[rows] = np.arange(len(rows))
        spots = M.SpotSpace.of(space, mu, sd, dev)
    joint = a.spatial == "joint"

    cfg, tokens, weights = prepare_backbone(
        a.preset, a.backbone_ckpt, [g.decode() for g in genes], gene_ids, n_genes=G, hist_dim=D, cond=a.cond,
        soft_norm=not a.no_soft_norm, id_init=not a.no_id_init, gate=a.gate, init=a.init, head=a.head,
        lora_rank=a.lora_rank if a.variant == "backbone-lora" else 0,
        spatial=a.spatial, **({"dropout": a.dropout} if a.dropout is not None else {}))
    net = build_model(cfg, tokens)
    if a.spatial != "none" and rank == 0:
        print(f"--spatial {a.spatial}: neighbours within {radius.radius_um or radius.radius_pitch:.3g} "
              f"{'µm' if radius.radius_um else 'spot pitches'}, up to {space.neighbours.count.max()} a spot")
    if a.head == "bins":                                 # bin edges from the training spots, saved with the run
        net.head.set_bins(X[tr_idx])
    unused, unexpected = load_backbone(net, weights, a.backbone_ckpt) if weights else ([], [])
    if unexpected and rank == 0:
        print(f"ignored {len(unexpected)} unexpected checkpoint keys: {', '.join(unexpected[:5])}")
    n_train = M.set_trainable(net, a.variant)
    net.to(dev)
    if rank == 0:
        print(f"{a.variant}: {n_train:,} trainable of {sum(p.numel() for p in net.parameters()):,} parameters; "
              f"{len(tr_idx)} train / {len(val_idx)} val spots from {len(train_names)} slices, "
              f"{G} genes, {D}-d features")
    diffusion = make_diffusion(a.objective, G, a.T, a.schedule, a.fill, a.loss_norm)
    model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True) if ddp else net
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(m) for m in a.milestones.split(",")], gamma=0.2)
    state = {"epoch": 0, "best": float("inf"), "bad_epochs": 0}
    last, best = os.path.join(a.out, "last.pt"), os.path.join(a.out, "best.pt")
    if a.resume:
        if not os.path.isfile(last):
            raise UserError(f"{last}: nothing to resume; run without --resume first")
        ck = read_run(last)
        net.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); sched.load_state_dict(ck["sched"])
        state = ck["state"]
        torch.set_rng_state(ck["rng"]["torch"]); np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
    elif rank == 0 and os.path.isfile(last):
        raise UserError(f"{a.out} already holds a run; pass --resume to continue it or choose another --out")
    keep = val_idx[:CALIBRATION_SPOTS]                   # sample.py calibrates the spread on these
    meta = {"val_features": H[keep] * sd + mu, "val_expr": X[keep], "test_slice": a.test_slice,
            "train_slices": train_names, "objective": a.objective, "schedule": a.schedule, "fill": a.fill, "T": a.T,
            "variant": a.variant, "backbone_ckpt": a.backbone_ckpt, "args": vars(a),
            "pixel_size_um": training_pixel_size(a.data, train_names),
            "context": context._asdict() if context else None,
            "spatial": radius._asdict() if radius else None,
            "val_space": calibration_space(space, rows[keep]) if space else None}

    def batches(idx, gen, aug, share=False):
        """Batches of `--batch-size` spots; with share, this process's rows rank::world of each (the dihedral
        views drawn for the whole batch, as one process would). A last batch smaller than the number of
        processes is dropped, so every process runs the same steps (it is another batch each epoch)."""
        for s in range(0, len(idx), a.batch_size):
            b = idx[s:s + a.batch_size]
            if share and len(b) < world:
                return
            v = gen.integers(0, 8, len(b)) if aug else None   # one of the 8 dihedral views per spot and epoch
            if share:
                b, v = b[rank::world], None if v is None else v[rank::world]
            yield spots_batch(b, v, None)

    def spots_batch(b, v, scored):
        """The tensors of X's spots b (dihedral views v): expression, features, surroundings, and for a patch
        (scored: which rows the loss counts) where each spot's neighbours lie in it."""
        h = torch.from_numpy(np.ascontiguousarray(A[b, v] if v is not None else H[b])).float().to(dev)
        around = spots.around(torch.from_numpy(rows[b]).to(dev)) if space else None
        chunk = None
        if scored is not None:
            nb = space.neighbours
            pos, w, cnt = (torch.from_numpy(x).to(dev) for x in patch_neighbours(rows[b], nb.idx, nb.weight, nb.count,
                                                                                len(kept)))
            chunk = Chunk(pos, w.float(), cnt, torch.from_numpy(scored).float().to(dev))
        return torch.from_numpy(X[b]).to(dev), h, around, chunk

    def patches(centres, gen, aug):
        """--spatial joint: the patch of --batch-size training spots around each centre (rows of X)."""
        allowed = np.zeros(len(kept), bool)
        allowed[rows[tr_idx]] = True                     # no validation spot's expression enters training
        for c in centres:
            b = kept_at[patch(rows[c], space.neighbours.idx, allowed, a.batch_size)]
            yield spots_batch(b, gen.integers(0, 8, len(b)) if aug else None, np.ones(len(b), bool))

    def validation_patches():
        """--spatial joint: patches around the validation spots among all kept spots, each scored once."""
        done, is_val = np.zeros(len(X), bool), np.zeros(len(X), bool)
        is_val[val_idx] = True
        for c in val_idx:
            if not done[c]:
                b = kept_at[patch(rows[c], space.neighbours.idx, kept, a.batch_size)]
                scored = is_val[b] & ~done[b]
                done[b[scored]] = True
                yield spots_batch(b, None, scored)

    def val_mse():
        net.eval()
        fork = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
        with fork, torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=a.amp):
            torch.manual_seed(1234)                      # the same masks every epoch: comparable validation
            tot = [diffusion.loss(net, x0, net.embed_histology(h, around), mask_ratio=a.mask_ratio, score=True,
                                  chunk=chunk).item() * (len(x0) if chunk is None else chunk.scored.sum().item())
                   for x0, h, around, chunk in (validation_patches() if joint else batches(val_idx, None, False))]
        net.train()
        return sum(tot) / len(val_idx)

    # at most a quarter of the epochs: a short run that never saw mostly-hidden inputs could not sample from scratch
    curriculum = min(a.curriculum_epochs, a.epochs // 4)
    if rank == 0 and curriculum < a.curriculum_epochs:
        print(f"curriculum shortened to {curriculum} epochs (a quarter of --epochs {a.epochs})")
    log_path = os.path.join(a.out, "log.csv")
    os.makedirs(a.out, exist_ok=True)
    net.train()
    while state["epoch"] < a.epochs:
        ep, t0 = state["epoch"], time.time()
        gen = np.random.default_rng(a.seed + ep)        # same order on every rank; each takes its share
        order = tr_idx[gen.permutation(len(tr_idx))]
        t_max = diffusion.curriculum_cap(0.2) if (ep < curriculum and a.objective == "masked") else None
        losses = []
        n_batches = -(-len(order) // a.batch_size)      # joint: as many patches, around random centres
        steps = patches(order[:n_batches], gen, A is not None) if joint else batches(order, gen, A is not None, ddp)
        for i, (x0, h, around, chunk) in enumerate(tqdm(steps, total=n_batches, desc=f"epoch {ep + 1}/{a.epochs}",
                                                        unit="batch", leave=False, disable=rank > 0)):
            n = min(a.batch_size, len(order) - i * a.batch_size)
            with torch.autocast(dev.type, torch.bfloat16, enabled=a.amp):
                loss = diffusion.loss(model, x0, net.embed_histology(h, around), t_max=t_max,
                                      mask_ratio=a.mask_ratio, share=(n, rank, world) if ddp else None, chunk=chunk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # official HINGE clips at 1.0
            opt.step()
            losses.append(loss.item())
        sched.step()
        v = val_mse()
        state["epoch"] = ep + 1
        # a curriculum epoch never trained on mostly hidden genes, so it cannot generate from scratch: selection
        # starts after it (as the official code validates only late); its low per-step loss picked collapsed
        # checkpoints on the demo
        selecting = ep >= curriculum
        improved = selecting and v < state["best"]
        state["best"], state["bad_epochs"] = (v, 0) if improved else (state["best"], state["bad_epochs"] + selecting)
        if rank == 0:
            ck = {**meta, "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state,
                  "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
            for path in ([best] if improved else []) + [last]:
                save_run(path, net, [g.decode() for g in genes], encoders, mu, sd, **ck)
            new = not os.path.isfile(log_path)
            with open(log_path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["epoch", "train_loss", "val_mse", "lr", "seconds"])
                w.writerow([ep + 1, f"{np.mean(losses):.5f}", f"{v:.5f}", f"{opt.param_groups[0]['lr']:.2e}",
                            f"{time.time() - t0:.1f}"])
            print(f"epoch {ep + 1}: train {np.mean(losses):.4f}  val MSE {v:.4f}{'  *' if improved else ''}  "
                  f"({time.time() - t0:.0f}s)")
        if state["epoch"] >= a.warmup and state["bad_epochs"] >= a.patience:
            if rank == 0:
                print(f"early stop: no improvement for {a.patience} epochs")
            break
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
