"""HINGE's generative process (the paper's Sec. 3): masked diffusion over genes (nested random gene orders under
the official schedule), the Gauss-Diff ablation, and the samplers: a batch of spots, and a whole slide in lockstep
for a run that generates jointly (train.py --spatial joint). The network they drive is model.py's."""
import math
from typing import NamedTuple

import torch

#################################################################################
#                               Masked diffusion                                #
#################################################################################

def hidden_counts(schedule, T, G):
    """Genes hidden at t = 0..T as the official scheduler counts them: ⌊γ(t)·G⌋ in float32 in its order of operations
    (float64 differs by one gene at some G, t), pow and cos rounded correctly as a scalar torch call does."""
    t = torch.arange(T + 1, dtype=torch.float32)
    if schedule == "linear":
        g = t / float(T)
    elif schedule == "cosine":
        g = 0.5 * (1 - torch.cos((math.pi * t / float(T)).double()).float())
    elif schedule == "poly-auto" or schedule.startswith("power:"):
        zeta = (min(max(math.log(1 / float(G)) / math.log(1.0 / float(max(2, T))), 1.05), 4.0)  # ζ = log_T G: exactly
                if schedule == "poly-auto" else float(schedule.split(":", 1)[1]))          # one gene visible at t = T-1
        g = 1 - ((1 - t / float(T)).double() ** zeta).float()
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use poly-auto, linear, cosine or power:<zeta>")
    return (g.clamp(0, 1) * G).long()


class MaskedDiffusion:
    """Nested random gene orders: at step t the first ⌊γ(t)·G⌋ genes of a sample's order are hidden."""
    # --spatial joint: the share of a patch's spots trained as alone. On smooth synthetic tissue 0.5 left the
    # histology path unlearnt in 40 epochs (PCC-50 0.10 against 0.63 for `slide`), 0.8 did not (0.55;
    # docs/analysis.md "Joint generation")
    ALONE = 0.8
    def __init__(self, G, T=50, schedule="poly-auto", fill="gauss", loss_norm="sample"):
        self.G, self.T, self.fill, self.loss_norm = G, T, fill, loss_norm
        self.n_hidden = hidden_counts(schedule, T, G)    # [T+1]

    def curriculum_cap(self, max_hidden=0.2):
        """Largest t whose hidden fraction is at most `max_hidden` (≥ 1): the warm-up range."""
        ok = (self.n_hidden <= max_hidden * self.G).nonzero().flatten()
        return max(int(ok.max()), 1)

    def gene_ranks(self, B, device, generator=None):
        return torch.rand(B, self.G, device=device, generator=generator).argsort(1).argsort(1)  # [B, G]

    def visible(self, ranks, t):                         # ranks [B, G], t [B] -> [B, G] bool
        return ranks >= self.n_hidden.to(ranks.device)[t][:, None]

    def fill_like(self, x, generator=None):
        if self.fill == "zero":
            return torch.zeros_like(x)
        return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)

    def loss(self, model, x0, hist_emb, t_max=None, mask_ratio="schedule", share=None, score=False, chunk=None):
        """The head's loss (the point head's MSE is the official `elboloss`) on the genes revealed between t and t-1;
        score: the MSE of the head's mean (validation). mask_ratio='uniform' (RandMask): a U(0,1) share hidden, loss on
        all of it. loss_norm='sample' averages each sample's genes first, so every t weighs the same ('batch', the
        official code's, generates worse: docs/analysis.md). share=(n, rank, world): x0 is rows rank::world of n.
        chunk (--spatial joint): the batch is a patch of one slide, every spot at one t as in the lockstep sampler,
        each with its own gene order, and each sees what its neighbours in the patch show (Chunk)."""
        n, rows = batch_rows(x0, share)
        dev = x0.device
        ranks = self.gene_ranks(n, dev)[rows]            # drawn for the whole batch on every rank: the ranks
        if chunk is not None and mask_ratio != "uniform":
            t = torch.randint(1, (t_max or self.T) + 1, (1,), device=dev).expand(n)
            vis, target = self.visible(ranks, t), self.visible(ranks, t - 1)
        elif mask_ratio == "uniform":                    # together draw what one process would
            m = (torch.rand(n, device=dev)[rows] * self.G).ceil().long().clamp(1, self.G)
            t = torch.searchsorted(self.n_hidden.to(dev), m).clamp(1, self.T)
            vis = ranks >= m[:, None]
            target = torch.ones_like(vis)
        else:
            t = torch.randint(1, (t_max or self.T) + 1, (n,), device=dev)[rows]
            vis, target = self.visible(ranks, t), self.visible(ranks, t - 1)
        xt = torch.where(vis, x0, self.fill_like(x0.new_empty(n, self.G))[rows])
        neighbours = None
        if chunk is not None:
            p = chunk.pos.clamp_min(0)                   # [n, M]
            neighbours = neighbour_state(xt[p], vis[p] & (chunk.pos >= 0)[..., None], chunk.weight, chunk.count)
            # most spots see no neighbour, as alone: else the model copies its neighbours' true values and never
            # learns to start a slide from histology, where no neighbour shows anything yet (a slide's first steps)
            alone = torch.rand(n, device=dev)[rows] < self.ALONE
            neighbours = neighbours * ~alone[:, None, None]
        out = model(xt, vis, t, target, hist_emb, None, neighbours).float()
        head = getattr(model, "module", model).head
        w = (target & ~vis).float()                      # newly revealed genes
        if chunk is not None:
            w = w * chunk.scored[:, None]
        err = ((head.mean(out) - x0) ** 2 if score else head.nll(out, x0)) * w
        if self.loss_norm == "batch":
            return err.sum() / w.sum().clamp_min(1)
        per_row = err.sum(1) / w.sum(1).clamp_min(1)
        return per_row.mean() if chunk is None else per_row.sum() / chunk.scored.sum().clamp_min(1)


class Chunk(NamedTuple):
    """A batch that is a patch of one slide (--spatial joint): where each spot's neighbours are among its rows."""
    pos: torch.Tensor                                    # [B, M] the batch row of each neighbour; -1: not in the batch
    weight: torch.Tensor                                 # [B, M] distance weights (0 for padding)
    count: torch.Tensor                                  # [B] neighbours within the radius, in the batch or not
    scored: torch.Tensor                                 # [B] float, 1 for the rows the loss counts


def neighbour_state(xs, shown, weight, count):
    """What a spot's neighbours show of each gene (--spatial joint): xs [..., n, M, G] their values, shown [..., n, M,
    G] which of those are revealed (False for padding), weight [n, M], count [n] neighbours within the radius ->
    [..., n, G, 2]: the weighted mean of the revealed values (0 where none shows the gene) and the share of the
    neighbours that show it."""
    w = weight[..., None] * shown                        # [..., n, M, G]
    mean = (w * xs.float()).sum(-2) / w.sum(-2).clamp_min(1e-12)
    share = shown.sum(-2) / count.clamp_min(1)[..., None]
    return torch.stack([mean, share.to(mean.dtype)], -1)


def batch_rows(x0, share):
    """(global batch size, this process's rows of it): every row without torchrun."""
    if share is None:
        return len(x0), slice(None)
    n, rank, world = share
    return n, slice(rank, None, world)


class GaussianDiffusion:
    """Gauss-Diff ablation: DDPM on the values (cosine ᾱ), the backbone predicts x0, DDIM sampling."""
    def __init__(self, G, T=50):
        self.G, self.T = G, T
        s = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2   # Nichol & Dhariwal cosine schedule
        self.alpha_bar = (f / f[0]).clamp(1e-5, 1.0).float()

    def loss(self, model, x0, hist_emb, t_max=None, mask_ratio="schedule", share=None, score=False, chunk=None):
        assert chunk is None, "--spatial joint is masked diffusion only (train.py refuses it)"
        n, rows = batch_rows(x0, share)
        dev = x0.device
        t = torch.randint(1, (t_max or self.T) + 1, (n,), device=dev)[rows]
        ab = self.alpha_bar.to(dev)[t][:, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(n, self.G, device=dev, dtype=x0.dtype)[rows]
        ones = torch.ones_like(x0, dtype=torch.bool)
        pred = model(xt, ones, t, ones, hist_emb)
        return ((pred.float() - x0) ** 2).mean()

    @torch.no_grad()
    def generate(self, model, h, K, generator=None, record=()):
        """DDIM (η = 0) from noise in K steps; h [S·B, D] embedded histology -> (x̂0 [S·B, G], {k: x̂0})."""
        dev, n = h.device, h.shape[0]
        ab = self.alpha_bar.to(dev)
        x = torch.randn(n, self.G, device=dev, generator=generator)
        ones, steps, taus = torch.ones(n, self.G, dtype=torch.bool, device=dev), {}, step_times(self.T, K)
        for k, (t, t_next) in enumerate(zip(taus[:-1], taus[1:])):
            x0 = model(x, ones, torch.full((n,), t, device=dev), ones, h).float()
            eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
            x = x0 if t_next == 0 else ab[t_next].sqrt() * x0 + (1 - ab[t_next]).sqrt() * eps
            if k in record:
                steps[k] = x0
        return x, steps


def make_diffusion(objective, G, T=50, schedule="poly-auto", fill="gauss", loss_norm="sample"):
    """The training/sampling process of a run: masked diffusion (HINGE) or Gauss-Diff (ablation)."""
    if objective == "masked":
        return MaskedDiffusion(G, T, schedule, fill, loss_norm)
    return GaussianDiffusion(G, T)


#################################################################################
#                                    Sampler                                    #
#################################################################################

def step_times(T, K):
    """K+1 evenly spaced steps T = τ0 > τ1 > ... > τK = 0."""
    if not 1 <= K <= T:
        raise ValueError(f"step budget K={K} must be between 1 and T={T}")
    return [round(T * (1 - k / K)) for k in range(K + 1)]


@torch.no_grad()
def generate(model, diffusion, hist, K, n_samples=1, generator=None, record=(), temperature=0.0, around=None):
    """HINGE's sampler for a batch: hist [B, hist_dim] -> (mean [B, G], samples [S, B, G], x̂0 {step k: [B, G]}).
    The histology (and with --spatial the spot's surroundings, `around`) is embedded once per spot; each step
    reveals the scheduled genes with values drawn from the head at `temperature` (0: its mean) and keeps them
    fixed, so a sample is a joint draw over the genes. Gauss-Diff: its DDIM."""
    B, G, S = hist.shape[0], diffusion.G, n_samples
    h = model.embed_histology(hist, around).repeat(S, 1)  # [S·B, D]
    if isinstance(diffusion, GaussianDiffusion):
        x, steps = diffusion.generate(model, h, K, generator, record)
    else:
        x, steps = reveal(model, diffusion, h, K, generator, record, temperature)
    samples = x.view(S, B, G)
    return samples.mean(0), samples, {k: v.view(S, B, G).mean(0) for k, v in steps.items()}


def reveal(model, diffusion, h, K, generator=None, record=(), temperature=0.0):
    """The masked-diffusion steps T = τ0 > ... > τK = 0 for [S·B] rows -> (values [S·B, G], {k: x̂0})."""
    dev, n = h.device, h.shape[0]
    ranks = diffusion.gene_ranks(n, dev, generator)
    order = ranks.argsort(1)                             # [n, G]: each row's genes by rank, hidden ones first
    x = diffusion.fill_like(torch.empty(n, diffusion.G, device=dev), generator)
    steps = {}
    taus = step_times(diffusion.T, K)
    for k, (t, t_next) in enumerate(zip(taus[:-1], taus[1:])):
        tt = torch.full((n,), t, device=dev)
        vis = diffusion.visible(ranks, tt)
        new = order[:, int(diffusion.n_hidden[t_next]):int(diffusion.n_hidden[t])]  # [n, R]: hidden at t, not at t_next
        recorded = k in record
        if new.shape[1] == 0 and not recorded:
            continue
        # the target mask is m_{t-1}, as in training, even when the step jumps to t_next (docs/analysis.md);
        # only=new: the last layer computes the revealed genes alone, the others serve as keys (a recorded step: all)
        out = model(x, vis, tt, diffusion.visible(ranks, tt - 1), h, None if recorded else new).float()
        draw = model.head.sample(out, temperature, generator)   # [n, R], or [n, G] when recorded
        value = draw.gather(1, new) if recorded else draw        # [n, R]
        x = x.scatter(1, new, value)                             # revealed genes stay fixed
        if recorded:
            steps[k] = torch.where(vis, x, model.head.mean(out))
    return x, steps


@torch.no_grad()
def generate_slide(model, diffusion, embed, nbr, K, n_samples=1, generator=None, temperature=0.0, tile=32):
    """Joint generation of a whole slide (--spatial joint), S samples at once: every spot advances one step
    together, `tile` spots at a time, and at each step a spot sees what its neighbours had revealed before it
    (its neighbours are gathered from the slide's state, the tile's halo). Writing a tile's new genes in place is
    safe: they were hidden at t, so no other spot reads them before the next step. embed(start, stop) -> [n, D]
    the embedded condition of those spots; nbr: idx [N, M], weight [N, M], count [N] (model.SpotSpace). The state
    is held for the whole slide, values as float16 and gene orders as int16 (4·S·G bytes a spot) -> samples
    [S, N, G] float16, each one joint draw over the slide."""
    N, G, S = len(nbr.idx), diffusion.G, n_samples
    dev = nbr.idx.device
    ranks = torch.stack([diffusion.gene_ranks(N, dev, generator) for _ in range(S)]).short()   # [S, N, G]
    x = diffusion.fill_like(torch.empty(S, N, G, device=dev), generator).half()
    n_hidden = [int(v) for v in diffusion.n_hidden]
    taus = step_times(diffusion.T, K)
    for t, t_next in zip(taus[:-1], taus[1:]):
        lo, hi = n_hidden[t_next], n_hidden[t]           # genes of rank lo..hi-1 are revealed at this step
        if lo == hi:
            continue
        for b in range(0, N, tile):
            e = min(b + tile, N)
            n = e - b
            r = ranks[:, b:e].reshape(S * n, G).long()
            xt = x[:, b:e].reshape(S * n, G).float()
            p = nbr.idx[b:e]                             # [n, M]
            pc = p.clamp_min(0)
            shown = (ranks[:, pc] >= hi) & (p >= 0)[..., None]                            # [S, n, M, G]
            state = neighbour_state(x[:, pc], shown, nbr.weight[b:e], nbr.count[b:e]).reshape(S * n, G, 2)
            new = r.argsort(1)[:, lo:hi]                 # [S·n, R]: hidden at t, shown at t_next
            tt = torch.full((S * n,), t, device=dev)
            out = model(xt, r >= hi, tt, r >= n_hidden[t - 1], embed(b, e).repeat(S, 1), new, state).float()
            xt = xt.scatter(1, new, model.head.sample(out, temperature, generator))
            x[:, b:e] = xt.view(S, n, G).half()
    return x
