"""Output heads of HINGE: the distribution a revealed gene's value is drawn from, read off the decoder's
input h [B, G, D] and the decoder's own value (model.Hinge ends in one of them; `train.py --head`).
Each gives the loss on a true value (nll), its mean (x̂0) and a draw at a temperature (0: the mean).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class PointHead(nn.Module):
    """The official value decoder's value, trained with MSE: a point, its own mean and its only draw."""
    def forward(self, h, point, only=None):              # h [B, G, D], point [B, G] -> [B, G]; only: h's genes
        return point

    def nll(self, out, x):
        return (out - x) ** 2

    def mean(self, out):
        return out

    def sample(self, out, temperature, generator=None):
        return out


class GaussianHead(PointHead):
    """N(mean, σ²) per gene and spot: mean = the decoder's value + a trainable level per gene and linear
    read of h (the frozen decoder cannot move a gene's level), log σ² likewise; Gaussian NLL."""
    def __init__(self, dim, n_genes):
        super().__init__()
        self.proj = nn.Linear(dim, 2)
        self.bias = nn.Parameter(torch.zeros(n_genes, 2))

    def forward(self, h, point, only=None):              # -> [B, G, 2]: mean, log σ²
        d = self.proj(h) + (self.bias if only is None else self.bias[only])
        return torch.stack([point + d[..., 0], d[..., 1].clamp(-9, 5)], -1)

    def nll(self, out, x):
        return 0.5 * (out[..., 1] + (x - out[..., 0]) ** 2 * torch.exp(-out[..., 1]))

    def mean(self, out):
        return out[..., 0]

    def sample(self, out, temperature, generator=None):
        if temperature == 0:                             # the mean, drawing nothing: the point sampler's operations
            return out[..., 0]
        eps = torch.randn(out.shape[:-1], device=out.device, generator=generator)
        return out[..., 0] + temperature * torch.exp(0.5 * out[..., 1]) * eps


class BetaNLLHead(GaussianHead):
    """The Gaussian head trained with β-NLL (Seitzer et al. 2022, β = 0.5 as they recommend): each gene's NLL
    weighted by its own variance^β, held constant, so a gene the model finds noisy still pulls its mean."""
    BETA = 0.5

    def nll(self, out, x):
        return super().nll(out, x) * torch.exp(self.BETA * out[..., 1]).detach()


class BinsHead(PointHead):
    """A categorical over fixed bins of log2(count + 1), zero its own bin (it holds the zero spike and
    several modes), as masked discrete diffusion and scGPT's binned values; cross-entropy. The edges
    come from the training spots (set_bins) and are saved with the run."""
    def __init__(self, dim, n_genes, n_bins):
        super().__init__()
        self.proj = nn.Linear(dim, n_bins)
        self.bias = nn.Parameter(torch.zeros(n_genes, n_bins))
        self.register_buffer("edges", torch.arange(n_bins + 1, dtype=torch.float32))  # [n_bins + 1]; bin 0 is [0, 0]
        self.register_buffer("centres", torch.arange(n_bins, dtype=torch.float32))   # mean training value per bin

    def set_bins(self, X):
        """Edges and centres from training expression X [N, G]: zero alone, even bins up to the maximum."""
        X = torch.as_tensor(X, dtype=torch.float32).flatten()
        top = float(X.max()) * 1.001 + 1e-6
        self.edges.copy_(torch.cat([torch.zeros(1), torch.linspace(1e-6, top, len(self.edges) - 1)]))
        k = self.bin_of(X)
        n = torch.bincount(k, minlength=len(self.centres)).float()
        mid = (self.edges[:-1] + self.edges[1:]) / 2
        self.centres.copy_(torch.where(n > 0, torch.bincount(k, X, len(self.centres)) / n.clamp_min(1), mid))
        with torch.no_grad():                            # start at the training marginal of each gene's values
            self.bias.copy_(torch.log(n / n.sum() + 1e-4).expand_as(self.bias))

    def bin_of(self, x):
        return torch.bucketize(x, self.edges[1:-1], right=True) * (x > 0)

    def forward(self, h, point, only=None):              # -> [B, G, n_bins] logits
        return self.proj(h) + (self.bias if only is None else self.bias[only])

    def nll(self, out, x):
        return F.cross_entropy(out.flatten(0, 1), self.bin_of(x).flatten(), reduction="none").view(x.shape)

    def mean(self, out):
        return torch.softmax(out, -1) @ self.centres

    def sample(self, out, temperature, generator=None):
        if temperature == 0:
            return self.mean(out)
        p = torch.softmax(out / temperature, -1).flatten(0, 1)
        k = torch.multinomial(p, 1, generator=generator).view(out.shape[:-1])
        lo, hi = self.edges[k] * (k > 0), self.edges[k + 1] * (k > 0)   # the zero bin is exactly 0
        return lo + (hi - lo) * torch.rand(k.shape, device=out.device, generator=generator)


def make_head(cfg):
    if cfg.head == "gaussian":
        return GaussianHead(cfg.dim, cfg.n_genes)
    if cfg.head == "beta-nll":
        return BetaNLLHead(cfg.dim, cfg.n_genes)
    if cfg.head == "bins":
        return BinsHead(cfg.dim, cfg.n_genes, cfg.head_bins)
    return PointHead()
