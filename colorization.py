"""Colorful image colorization: lecture 13, pretext task 5.

Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016. Work in CIE
Lab: the network F sees only the lightness L and an "ab" head paints the two
colour channels. Colour is treated as classification: ab space is quantised
into bins on a grid of 10 (the bins inside the sRGB gamut), each pixel's
target is soft-encoded over its 5 nearest bins, the cross-entropy is
rebalanced so rare, saturated colours are not washed out, and the image is
decoded with the "annealed mean" of the predicted distribution.

    python colorization.py                            # built-in shapes; grid.png in the run folder
    python colorization.py --loss regression          # plain L2 on ab: compare the grids (paper Fig. 3)
    python colorization.py --dataset folder --data-dir data/cifar10-jpg --epochs 5

Departures from the paper (docs/colorization.md, with their measured effects):
- 261 ab bins, computed from the sRGB gamut, where the paper has 313 from its data.
- The network: a ResNet backbone and a small ab head at a quarter of the image side, where
  the paper has a VGG-style network with dilated convolutions; learning rate 1e-3 for a
  few thousand steps, where the paper takes 3e-5 over 450k. Not measured against the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    # Photos: whole images kept with their shorter side at 256/176 of --image-size, as the
    # released code trains on random 176 px crops of 256 px images (--load-size overrides).
    LOAD_SCALE: ClassVar[float] = 256 / 176
    epochs: int = 20  # sized for the 3-minute CPU budget on the built-in data (paper: 450k steps)
    batch_size: int = 64  # paper: 40; 64 gives twice the steps of 128 in the same number of epochs
    lr: float = 1e-3  # Adam (paper: 3e-5 for ImageNet over 450k steps; 1e-3 for a few thousand here)
    beta2: float = 0.99  # Adam's beta2 (paper: 0.99; beta1 0.9)
    weight_decay: float = 1e-3  # L2 weight decay (paper: 1e-3)
    loss: str = "classification"  # classification (paper) | regression (L2 on ab, the paper's baseline)
    rebalance: float = 0.5  # lambda mixing the prior with uniform for the class weights (paper: 0.5); 1 = no rebalancing
    temperature: float = 0.38  # annealed-mean temperature T for decoding (paper: 0.38)
    prior_images: int = 2000  # training images the colour prior is estimated from, at the start


# ---------------------------------------------------------------------------
# Pretext data: L in, quantised ab out
# ---------------------------------------------------------------------------
GRID = 10.0  # ab bin size (paper: 10)


def ab_bins(grid: float = GRID) -> torch.Tensor:
    """Centres (Q, 2) of the ab grid cells that some sRGB colour falls into.

    Computed from the gamut itself: a dense sample of the sRGB cube goes through
    common.rgb_to_lab, and a cell counts if any colour lands in it. The paper has 313
    such bins (computed over ImageNet's colours at all L); a dense cube sample finds a
    few more or fewer (docs/colorization.md)."""
    steps = torch.linspace(0, 1, 64)
    rgb = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij")).reshape(3, -1)
    lab = common.rgb_to_lab(rgb.T.reshape(-1, 3, 1, 1)).reshape(-1, 3)
    cells = torch.unique(torch.round(lab[:, 1:] / grid), dim=0)
    return cells * grid


def soft_targets(ab: torch.Tensor, bins: torch.Tensor, k: int = 5, sigma: float = 5.0, table=None):
    """The soft targets Z of ab (N, 2, H, W), kept sparse: each pixel's k nearest bins
    (N, k, H, W, nearest first) and their Gaussian weights exp(-d^2 / 2 sigma^2), summing to
    1 (paper sec. 2.1); every other bin's Z is 0. With `table` (bin_table(bins)) the k
    nearest are searched near each pixel's own grid cell (the same bins, either one on an
    exact tie: nearest_bins); without it, among all Q bins."""
    n, _, h, w = ab.shape
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    if table is None:
        near_d2, near = squared_distances(flat, bins.to(ab)).topk(k, dim=1, largest=False)
    else:
        near_d2, near = nearest_bins(flat, table, k)
    weights = torch.exp((near_d2[:, :1] - near_d2) / (2 * sigma ** 2))  # Gaussian weights (nearest first: at most 1)
    weights /= weights.sum(1, keepdim=True)  # normalised (softmax over k = 5 columns, 3x faster on a CPU)
    return near.view(n, h, w, k).permute(0, 3, 1, 2), weights.view(n, h, w, k).permute(0, 3, 1, 2)


def squared_distances(flat: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(P, 2) ab values, (Q, 2) bins -> (P, Q) squared distances da^2 + db^2, written out
    (torch.cdist takes a square root, and for many points a less exact matrix product)."""
    d = bins.T[:, None] - flat.T[:, :, None]  # (2, P, Q)
    return (d * d).sum(0)


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, k: int = 5, sigma: float = 5.0, table=None) -> torch.Tensor:
    """ab (N, 2, H, W) -> Z (N, Q, H, W), the paper's H_gt^-1(Y) written out: soft_targets'
    weights at their bins, 0 elsewhere (for reading and testing; training keeps Z sparse)."""
    near, weights = soft_targets(ab, bins, k, sigma, table)
    n, _, h, w = ab.shape
    return torch.zeros(n, len(bins), h, w, device=ab.device).scatter_(1, near, weights)


def bin_table(bins: torch.Tensor, grid: float = GRID, reach: int = 2) -> dict:
    """The grid behind the bins, for nearest_bins: cell (i, j) -> index of its bin (Q
    where the cell has none: a bin at infinity), over the bins' box widened by `reach`
    cells, kept flat (cell i * width + j); the offsets of a cell's window in that order."""
    cells = torch.round(bins / grid).long()
    low = cells.min(0).values - reach
    size = cells.max(0).values - low + reach + 1
    index = torch.full(size.tolist(), len(bins), dtype=torch.long, device=bins.device)
    index[tuple((cells - low).T)] = torch.arange(len(bins), device=bins.device)
    steps = torch.arange(-reach, reach + 1, device=bins.device)
    offsets = (steps[:, None] * size[1] + steps).flatten()  # (2r + 1)^2 offsets, row by row
    far = torch.full_like(bins[:1], float("inf"))  # index Q: no bin, never among the nearest
    a, b = torch.cat([bins, far]).T.contiguous()
    return {"index": index.flatten(), "low": low, "size": size, "grid": grid, "reach": reach, "offsets": offsets,
            "a": a, "b": b}


def nearest_bins(flat: torch.Tensor, table: dict, k: int):
    """squared_distances(flat, bins).topk(k, largest=False), found among the bins of the
    (2r + 1) x (2r + 1) cells around each pixel's own cell (r = reach), the distances taken
    to those bins only, rather than to all Q bins (261 at every pixel). Exact: a pixel lies
    within half a cell of its cell's centre, so every bin outside the window is at least
    r + 1/2 cells away; where the k-th nearest in the window is nearer, it is the answer.
    The rest (ab beyond the grid's box, or a sparse corner of the gamut) get the full search."""
    r, grid = table["reach"], table["grid"]
    own = torch.round(flat / grid).long() - table["low"]  # the pixel's cell, in table coordinates
    inside = ((own >= r) & (own < table["size"] - r)).all(1)
    own = torch.where(inside[:, None], own, r)  # (pixels outside the box: any cell; searched in full below)
    cell = own[:, 0] * table["size"][1] + own[:, 1]  # in the flat table
    window = lookup(table["index"], cell[:, None] + table["offsets"])  # P x (2r+1)^2 bin indices
    a, b = lookup(table["a"].to(flat), window) - flat[:, :1], lookup(table["b"].to(flat), window) - flat[:, 1:]
    near_d2, j = (a * a + b * b).topk(k, dim=1, largest=False)
    near = window.gather(1, j)
    full = ~inside | (near_d2[:, -1] > ((r + 0.5) * grid) ** 2)
    if full.any():
        bins = torch.stack([table["a"][:-1], table["b"][:-1]], 1).to(flat)
        near_d2[full], near[full] = squared_distances(flat[full], bins).topk(k, dim=1, largest=False)
    return near_d2, near


def lookup(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] for 1-d values and a (P, m) index: a gather from values broadcast over
    P rows, the same result, 3x faster on a CPU than advanced indexing."""
    return values.expand(len(index), -1).gather(1, index)


def colour_prior(ab_batches, bins: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Empirical distribution of the nearest bins over the given ab maps, smoothed with a
    Gaussian (sigma in ab units) over the bin grid (paper sec. 2.2)."""
    counts = torch.zeros(len(bins))
    for ab in ab_batches:
        flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
        counts += torch.cdist(flat, bins).argmin(1).bincount(minlength=len(bins)).float()
    p = counts / counts.sum()
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / (2 * sigma ** 2))
    smoothed = kernel @ p
    return smoothed / smoothed.sum()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """w proportional to ((1 - lam) * prior + lam / Q) ** -1, scaled so that the
    prior-weighted mean E_prior[w] = sum_q prior_q w_q is 1 (paper eq. 3-4)."""
    w = ((1 - lam) * prior + lam / len(prior)) ** -1
    return w / (prior * w).sum()


def ab_at(x: torch.Tensor, size: int) -> torch.Tensor:
    """The pixels the targets are taken at, at the output's size (H/4): every 4th row and
    column, as the released code takes them (a fixed 1x1 convolution of stride 4). 4x4
    means would blend the colours on either side of an edge into bins that no pixel has.
    x: ab, or the RGB image (Lab is per pixel: the same ab, with 1/16 of the conversion)."""
    return F.interpolate(x, size=(size, size), mode="nearest")


def split_lab(x: torch.Tensor):
    """RGB in [0, 1] -> (L scaled to about [-1, 1], (N, 1, H, W); ab in Lab units, (N, 2, H, W))."""
    lab = common.rgb_to_lab(x)
    return lab[:, :1] / 50 - 1, lab[:, 1:]


# ---------------------------------------------------------------------------
# Model: F on L, and the ab head
# ---------------------------------------------------------------------------
class ColorizationNet(nn.Module):
    """F: the backbone applied to L (repeated over its 3 input channels, so it stays a
    standard RGB backbone); head: transposed convolutions up to a quarter of the image
    side (paper: 56 of 224 px), then a 1x1 convolution to Q bin logits (or 2 ab values)."""

    def __init__(self, backbone: nn.Module, width: int, image_size: int, outputs: int):
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            side = common.feature_map(backbone.eval(), torch.zeros(1, 3, image_size, image_size)).shape[-1]
        backbone.train()
        layers, channels = [], width
        while side < image_size // 4:
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(True)]
            channels, side = channels // 2, side * 2
        layers.append(nn.Conv2d(channels, outputs, 1))
        self.head = nn.Sequential(*layers)
        self.out_size = image_size // 4

    def forward(self, L):  # (N, 1, H, W), scaled L -> (N, outputs, H/4, W/4)
        out = self.head(common.feature_map(self.backbone, L.expand(-1, 3, -1, -1)))
        return F.interpolate(out, size=(self.out_size, self.out_size), mode="bilinear") \
            if out.shape[-1] != self.out_size else out


# ---------------------------------------------------------------------------
# Loss: L_cl, the rebalanced multinomial cross-entropy (paper eq. 2)
# ---------------------------------------------------------------------------
def multinomial_loss(logits: torch.Tensor, near: torch.Tensor, Z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L_cl(Zhat, Z) = -sum_hw v(Z_hw) sum_q Z_hwq log Zhat_hwq (paper eq. 2), averaged over
    pixels: the cross-entropy against the soft targets, each pixel weighted by v, the
    class-rebalancing weight of its nearest bin. Z is sparse (soft_targets): only the k
    nearest bins `near` of a pixel have Z_hwq > 0, so the sum over q runs over those k.
    logits (N, Q, h, w); near, Z (N, k, h, w); v (N, h, w)."""
    return -(v * (Z * F.log_softmax(logits, dim=1).gather(1, near)).sum(1)).mean()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def augment(x, args: Args) -> torch.Tensor:
    """The released code's crop and mirror (its data layer: crop_size 176, mirror). Photos
    (whole images kept at --load-size): a random --image-size window; images that are
    --image-size squares already (the built-in shapes, CIFAR-10): the whole image. Either
    flipped at random."""
    if isinstance(x, common.WholeImages):
        return common.random_crop(x, args.image_size, flip=True)
    return common.select(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x, x.flip(-1))


def train(args: Args):
    if args.loss not in ("classification", "regression"):
        common.fail(f"--loss must be classification or regression, not {args.loss}")
    common.check_image_size(args, 16, "an ab head at a quarter of the image side")
    run = common.Run(args, "colorization")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    bins = ab_bins().to(run.device)
    table = bin_table(bins)  # for the soft encoding's nearest-bin search
    # The prior: ab of the first --prior-images training images, once, at the start.
    sample = torch.stack([data.train[i][0] for i in range(min(args.prior_images, len(data.train)))])
    prior = colour_prior([split_lab(sample[i:i + 500].float() / 255)[1] for i in range(0, len(sample), 500)],
                         bins.cpu()).to(run.device)
    weights = rebalance_weights(prior, args.rebalance)
    if run.is_main:
        run.save({"bins": bins.cpu(), "prior": prior.cpu(), "weights": weights.cpu()}, "prior.pt")
    run.print(f"{len(bins)} in-gamut ab bins on a grid of {GRID:g}; class weights from "
              f"{weights.min():.2f} to {weights.max():.2f}")
    backbone, width = common.build_backbone(args.backbone, args.image_size)
    outputs = len(bins) if args.loss == "classification" else 2
    model = run.prepare(ColorizationNet(backbone, width, args.image_size, outputs))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay,
                                 fused=run.fused)

    total_steps = args.epochs * len(loader)
    parts = {"model": model, "optimizer": optimizer}

    def redraw():  # grid.png after every epoch, to watch the pretext task being learned
        save_grid(common.unwrap(model), data.test, bins, args, run.device, run.out / "grid.png")

    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: LightnessEncoder(net.backbone))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor, epoch_end=redraw):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr))
        x = augment(run.to_device(images), args)  # (N, 3, S, S)
        L = common.lightness(x) / 50 - 1  # (N, 1, H, W), scaled as split_lab's
        ab = common.rgb_to_lab(ab_at(x, net.out_size))[:, 1:]  # targets at the output size, H/4: (N, 2, h, w)
        with run.autocast():
            out = model(run.format(L)).float()  # (N, Q or 2, H/4, W/4)
        if args.loss == "classification":
            near, Z = soft_targets(ab, bins, table=table)  # soft targets: the 5 nearest bins (N, 5, h, w), weights
            loss = multinomial_loss(out, near, Z, weights[near[:, 0]])  # v(Z_hw): the weight of the nearest bin
        else:
            loss = F.mse_loss(out, ab / 100)  # ab scaled to about [-1, 1]
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(len(images), loss=loss.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    run.save_encoder(net.backbone)
    if not run.is_main:
        return run.close()
    results = {**test_ab_error(net, data.test, bins, args, run.device), "steps": run.step, "num_bins": len(bins)}
    run.print(f"mean |ab error| on the test split: {results['pretext_ab_error']:.2f}, colourfulness (chroma of "
              f"the output / the original's): {results['pretext_colourfulness']:.3f} (grid: {run.out / 'grid.png'})")
    return run.finish(results, data, LightnessEncoder(net.backbone),
                      lambda: LightnessEncoder(common.build_backbone(args.backbone, args.image_size)[0]))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, the colours it predicts, the grid
# ---------------------------------------------------------------------------
class LightnessEncoder(nn.Module):
    """What the evaluation protocol sees: RGB in [0, 1] -> L -> backbone features."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(split_lab(x)[0].expand(-1, 3, -1, -1))


def annealed_mean(logits: torch.Tensor, bins: torch.Tensor, T: float = 0.38) -> torch.Tensor:
    """logits (N, Q, H, W) -> ab (N, 2, H, W): the mean of the distribution re-tempered
    as f_T(z) = exp(log z / T) / sum exp(log z / T) (paper sec. 2.3). T = 1 gives the
    mean, T -> 0 the mode."""
    p = torch.softmax(torch.log_softmax(logits, dim=1) / T, dim=1)
    return torch.einsum("nqhw,qc->nchw", p, bins.to(p))


def colourise(model, x, bins, args):
    """Input L with the predicted ab (upsampled to full size) -> RGB."""
    L, _ = split_lab(x)
    out = model(L)
    ab = annealed_mean(out, bins, args.temperature) if args.loss == "classification" else out * 100
    ab = F.interpolate(ab, size=x.shape[-2:], mode="bilinear")
    return common.lab_to_rgb(torch.cat([(L + 1) * 50, ab], dim=1))


@torch.no_grad()
def test_ab_error(model, dataset, bins, args, device, batch_size=256) -> dict:
    """On the test split: the mean absolute ab error of the decoded colours (Lab units), and
    colourfulness: the mean chroma |ab| of the decoded colours over that of the true ones
    (paper sec. 3.1: regression to ab averages the modes and comes out greyish, < 1)."""
    model.eval()
    total = count = chroma_pred = chroma_true = 0.0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x = common.to_float(images, device)
        L, ab = split_lab(x)
        out = model(L)
        pred = annealed_mean(out, bins, args.temperature) if args.loss == "classification" else out * 100
        target = F.adaptive_avg_pool2d(ab, pred.shape[-2:])
        total += (pred - target).abs().mean().item() * len(x)
        chroma_pred += pred.norm(dim=1).mean().item() * len(x)
        chroma_true += target.norm(dim=1).mean().item() * len(x)
        count += len(x)
    model.train()
    return {"pretext_ab_error": total / count, "pretext_colourfulness": chroma_pred / max(chroma_true, 1e-12)}


@torch.no_grad()
def save_grid(model, dataset, bins, args, device, path, n: int = 8):
    """Rows: greyscale input, colourised output, original."""
    n = min(n, len(dataset))  # a test split may be smaller than a row
    x = common.to_float(torch.stack([dataset[i][0] for i in range(n)]), device)
    was_training = model.training
    model.eval()
    grey = ((split_lab(x)[0] + 1) / 2).expand(-1, 3, -1, -1)
    rows = torch.cat([grey, colourise(model, x, bins, args), x])
    model.train(was_training)
    common.save_picture(path, rows, nrow=n)


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
