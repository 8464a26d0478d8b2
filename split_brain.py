"""Split-brain autoencoders: lecture 13, pretext task 6.

Zhang, Isola, Efros, "Split-Brain Autoencoders: Unsupervised Learning by
Cross-Channel Prediction", CVPR 2017. Split the input channels, X1 = L and
X2 = ab, and the network into two disjoint halves: F1 predicts ab from L, F2
predicts L from ab. Each half is half the width of the whole network, so the
concatenated representation is as wide as one network's. Each half is trained
with a classification loss over quantised values, each target softly spread
over its nearest bins (the paper found classification better than regression,
Table 2). The representation is the concatenation of both halves' features on
the full Lab image.

    python split_brain.py                             # built-in shapes; grid.png in the run folder
    python split_brain.py --loss regression           # L2 losses instead, the paper's comparison
    python split_brain.py --halves full --turn-hues --epochs 15   # ours: whole-network halves, turned hues for F2
    python split_brain.py --dataset folder --data-dir data/cifar10-jpg --epochs 5

Departures from the paper (docs/split_brain.md, with their measured effects):
- No class rebalancing in either half: the paper's split-brain section defines the loss
  with the soft encoding alone, and its training code is not released.
- The network: halves of a ResNet backbone with heads at a quarter of the image side,
  where the paper splits AlexNet. Not measured against the paper's.
- Opt-in, ours: --halves full (each half a whole network, twice the width) and
  --turn-hues (F2 sees each image's ab turned by a random angle); measured in docs/split_brain.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    # Photos: whole images kept with their shorter side at 256/176 of --image-size, the
    # colorization code's random 176 px crops of 256 px images (split-brain's training code
    # is not released; the paper builds on that one). --load-size overrides.
    LOAD_SCALE: ClassVar[float] = 256 / 176
    epochs: int = 30  # sized for the 3-minute CPU budget on the built-in data (paper: ImageNet)
    batch_size: int = 64  # twice the steps of 128 in the same time; the paper does not say its batch size
    lr: float = 1e-3  # Adam
    loss: str = "classification"  # classification (paper) | regression (L2 on ab and on L)
    l_bins: int = 50  # F2's classes: L quantised into this many bins over [0, 100]
    halves: str = "half"  # half: the paper's split of one network into two half-width halves | full: each half a whole --backbone network (ours, not the paper's; docs)
    turn_hues: bool = False  # F2 sees ab turned by a random hue angle per image during training (ours, not the paper's; docs)


# ---------------------------------------------------------------------------
# Pretext data: L and ab, each quantised for the other half to predict
# ---------------------------------------------------------------------------
GRID = 10.0  # ab bin size, as in colorization.py


def ab_bins(grid: float = GRID) -> torch.Tensor:
    """Centres (Q, 2) of the ab grid cells that some sRGB colour falls into (as colorization.py)."""
    steps = torch.linspace(0, 1, 64)
    rgb = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij")).reshape(3, -1)
    lab = common.rgb_to_lab(rgb.T.reshape(-1, 3, 1, 1)).reshape(-1, 3)
    return torch.unique(torch.round(lab[:, 1:] / grid), dim=0) * grid


def l_centres(l_bins: int) -> torch.Tensor:
    """Centres (l_bins, 1) of the L bins over [0, 100]."""
    return ((torch.arange(l_bins) + 0.5) * 100 / l_bins).view(-1, 1)


def soft_targets(values: torch.Tensor, centres: torch.Tensor, k: int = 5, sigma: float = 5.0, table=None):
    """The soft targets of values (N, D, h, w), kept sparse: each pixel's k nearest bin
    centres (Q, D) as (N, k, h, w) indices, nearest first, and their Gaussian weights
    exp(-d^2 / 2 sigma^2), summing to 1; every other bin's target is 0. This is H(X) of the
    paper's classification loss (sec. 3.1, eq. 4), the soft encoding of the colorization
    paper (Zhang et al. 2016, sec. 2.1): for ab k = 5, sigma = 5 (half a bin), and for L the
    same, half an L bin. Neither paper's split-brain section rebalances the classes, so
    neither half does here. `table` (bin_table(ab bins)): the ab search near each pixel's
    own grid cell, the same bins, faster; without it, among all Q."""
    n, d, h, w = values.shape
    flat = values.permute(0, 2, 3, 1).reshape(-1, d)
    k = min(k, len(centres))
    if table is None:
        near_d2, near = squared_distances(flat, centres.to(values)).topk(k, dim=1, largest=False)
    else:
        near_d2, near = nearest_bins(flat, table, k)
    weights = torch.exp((near_d2[:, :1] - near_d2) / (2 * sigma ** 2))  # Gaussian weights (nearest first: at most 1)
    weights /= weights.sum(1, keepdim=True)  # normalised (softmax over k columns; as colorization.py)
    return near.view(n, h, w, k).permute(0, 3, 1, 2), weights.view(n, h, w, k).permute(0, 3, 1, 2)


def squared_distances(flat: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(P, D) values, (Q, D) centres -> (P, Q) squared distances, written out (as colorization.py)."""
    d = centres.T[:, None] - flat.T[:, :, None]  # (D, P, Q)
    return (d * d).sum(0)


def soft_encode(values: torch.Tensor, centres: torch.Tensor, k: int = 5, sigma: float = 5.0,
                table=None) -> torch.Tensor:
    """values (N, D, h, w) -> targets (N, Q, h, w), written out: soft_targets' weights at
    their bins, 0 elsewhere (for reading and testing; the loss takes them sparse)."""
    near, weights = soft_targets(values, centres, k, sigma, table)
    n, _, h, w = values.shape
    return torch.zeros(n, len(centres), h, w, device=values.device).scatter_(1, near, weights)


def bin_table(bins: torch.Tensor, grid: float = GRID, reach: int = 2) -> dict:
    """The grid behind the ab bins, for nearest_bins: cell (i, j) -> index of its bin (Q
    where the cell has none: a bin at infinity), kept flat, over the bins' box widened by
    `reach` cells; the offsets of a cell's window (as colorization.py)."""
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
    """squared_distances(flat, bins).topk(k, largest=False) for ab values, found among the
    bins of the (2r + 1) x (2r + 1) cells around each pixel's own cell (r = reach), the
    distances taken to those bins only (as colorization.py, which says why it is exact);
    the rest get the full search."""
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
    """values[index] for 1-d values and a (P, m) index, by a gather (as colorization.py)."""
    return values.expand(len(index), -1).gather(1, index)


def turn_hues(lab: torch.Tensor) -> torch.Tensor:
    """Lab (N, 3, H, W) with each image's ab plane rotated by its own random angle: every
    hue moves by the same angle, chroma and L stay. Not in the paper: on the built-in
    images a part's colour nearly fixes its lightness, so F2 could predict L from ab by
    looking a colour up; with the hues turned it has to use the layout of the colours."""
    theta = torch.rand(len(lab), 1, 1, device=lab.device) * 2 * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    a, b = lab[:, 1], lab[:, 2]
    return torch.stack([lab[:, 0], cos * a - sin * b, sin * a + cos * b], dim=1)


def scale_lab(lab: torch.Tensor) -> torch.Tensor:
    """Lab (N, 3, H, W) -> scaled to about [-1, 1] per channel, the networks' input."""
    return torch.cat([lab[:, :1] / 50 - 1, lab[:, 1:] / 100], dim=1)


def lab_input(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> scaled Lab: (N, 3, H, W)."""
    return scale_lab(common.rgb_to_lab(x))


# ---------------------------------------------------------------------------
# Model: two disjoint halves, each with a head
# ---------------------------------------------------------------------------
def half_network(backbone_name: str, image_size: int, in_channels: int, half_width: bool):
    """One half: a backbone (of half the width if `half_width`) whose first convolution
    takes `in_channels` channels."""
    net, width = common.build_backbone(backbone_name, image_size, half=half_width)
    old = net.conv1
    net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    return net, width


class Head(nn.Module):
    """Transposed convolutions from the feature map to a quarter of the image side, then
    a 1x1 convolution to `outputs` channels (as colorization.py's ab head)."""

    def __init__(self, backbone, width, image_size, in_channels, outputs):
        super().__init__()
        with torch.no_grad():
            side = common.feature_map(backbone.eval(), torch.zeros(1, in_channels, image_size, image_size)).shape[-1]
        backbone.train()
        layers, channels = [], width
        while side < image_size // 4:
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(True)]
            channels, side = channels // 2, side * 2
        layers.append(nn.Conv2d(channels, outputs, 1))
        self.net = nn.Sequential(*layers)
        self.out_size = image_size // 4

    def forward(self, fmap):
        out = self.net(fmap)
        return F.interpolate(out, size=(self.out_size, self.out_size), mode="bilinear") \
            if out.shape[-1] != self.out_size else out


class SplitBrain(nn.Module):
    def __init__(self, backbone_name: str, image_size: int, ab_outputs: int, l_outputs: int,
                 half_width: bool = False):
        super().__init__()
        self.f1, w1 = half_network(backbone_name, image_size, 1, half_width)  # F1 sees L only
        self.f2, w2 = half_network(backbone_name, image_size, 2, half_width)  # F2 sees ab only
        self.head1 = Head(self.f1, w1, image_size, 1, ab_outputs)  # -> ab
        self.head2 = Head(self.f2, w2, image_size, 2, l_outputs)  # -> L
        self.width = w1 + w2

    def forward(self, lab):  # (N, 3, H, W) scaled Lab -> (ab prediction from L, L prediction from ab)
        X1, X2 = lab[:, :1], lab[:, 1:]  # the split of the input channels
        return self.head1(common.feature_map(self.f1, X1)), self.head2(common.feature_map(self.f2, X2))


# ---------------------------------------------------------------------------
# Loss: the cross-entropy against the soft targets, for each half (paper eq. 4)
# ---------------------------------------------------------------------------
def soft_cross_entropy(logits: torch.Tensor, near: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """-sum_q Z_q log softmax(logits)_q, averaged over pixels (paper eq. 4), with the
    targets sparse (soft_targets): Z_q > 0 only at a pixel's k nearest bins `near`, so the
    sum runs over those. logits (N, Q, h, w); near, Z (N, k, h, w)."""
    return -(Z * F.log_softmax(logits, dim=1).gather(1, near)).sum(1).mean()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def augment(x, args: Args) -> torch.Tensor:
    """The colorization code's crop and mirror. Photos (whole images kept at --load-size): a
    random --image-size window; images that are --image-size squares already (the built-in
    shapes, CIFAR-10): the whole image. Either flipped at random."""
    if isinstance(x, common.WholeImages):
        return common.random_crop(x, args.image_size, flip=True)
    return common.select(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x, x.flip(-1))


def train(args: Args):
    if args.loss not in ("classification", "regression"):
        common.fail(f"--loss must be classification or regression, not {args.loss}")
    if args.halves not in ("full", "half"):
        common.fail(f"--halves must be full or half, not {args.halves}")
    if args.l_bins < 2:
        common.fail(f"--l-bins must be at least 2, not {args.l_bins}")
    common.check_image_size(args, 16, "heads at a quarter of the image side")
    run = common.Run(args, "split_brain")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    bins = ab_bins().to(run.device)
    table = bin_table(bins)  # for the ab soft encoding's nearest-bin search
    classify = args.loss == "classification"
    L_bins = l_centres(args.l_bins).to(run.device)
    half_width = args.halves == "half"
    model = run.prepare(SplitBrain(args.backbone, args.image_size, len(bins) if classify else 2,
                                   args.l_bins if classify else 1, half_width))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=run.fused)
    run.print(f"F1: L -> ab over {len(bins)} bins; F2: ab -> L over {args.l_bins} bins; "
              f"representation width {common.unwrap(model).width}")

    total_steps = args.epochs * len(loader)
    parts = {"model": model, "optimizer": optimizer}

    def redraw():  # grid.png after every epoch, to watch the pretext task being learned
        save_grid(common.unwrap(model), data.test, bins, args, run.device, run.out / "grid.png")

    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: SplitBrainEncoder(net))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor, epoch_end=redraw):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr))
        x = augment(run.to_device(images), args)  # (N, 3, S, S)
        lab = common.rgb_to_lab(x)  # (N, 3, H, W): L, a, b
        seen = turn_hues(lab) if args.turn_hues else lab  # F1 sees only L, so this changes F2's input alone
        with run.autocast():
            out1, out2 = model(run.format(scale_lab(seen)))  # F1(L): (N, Q or 2, h, w); F2(ab): (N, l_bins or 1, h, w)
        out1, out2 = out1.float(), out2.float()
        target = F.adaptive_avg_pool2d(lab, out1.shape[-2:])  # Lab at the heads' size
        if classify:
            loss1 = soft_cross_entropy(out1, *soft_targets(target[:, 1:], bins, sigma=GRID / 2, table=table))  # L -> ab
            loss2 = soft_cross_entropy(out2, *soft_targets(target[:, :1], L_bins, sigma=50 / args.l_bins))  # ab -> L
        else:
            loss1 = F.mse_loss(out1, target[:, 1:] / 100)
            loss2 = F.mse_loss(out2, target[:, :1] / 50 - 1)
        loss = loss1 + loss2
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(len(images), loss_ab=loss1.item(), loss_L=loss2.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    run.save_encoder(nn.ModuleDict({"f1": net.f1, "f2": net.f2}))
    if not run.is_main:
        return run.close()
    results = {**test_errors(net, data.test, bins, args, run.device), "steps": run.step}
    if classify:
        run.print(f"test split, cross-entropy of F1 (L -> ab) {results['pretext_ab_xent']:.3f} (the best constant "
                  f"guess: {results['pretext_ab_xent_constant']:.3f}), of F2 (ab -> L) {results['pretext_L_xent']:.3f} "
                  f"({results['pretext_L_xent_constant']:.3f})")
    run.print(f"test split: mean |ab error| from L {results['pretext_ab_error']:.2f} (always grey: "
              f"{results['pretext_ab_error_grey_guess']:.2f}), mean |L error| from ab {results['pretext_L_error']:.2f} "
              f"(always the mean L: {results['pretext_L_error_mean_guess']:.2f}); grid: {run.out / 'grid.png'}")
    return run.finish(results, data, SplitBrainEncoder(net),
                      lambda: SplitBrainEncoder(SplitBrain(args.backbone, args.image_size, 2, 1, half_width)))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, the predictions' errors, the grid
# ---------------------------------------------------------------------------
class SplitBrainEncoder(nn.Module):
    """What the evaluation protocol sees: RGB in [0, 1] -> Lab -> [F1(L), F2(ab)] concatenated."""

    def __init__(self, model: SplitBrain):
        super().__init__()
        self.f1, self.f2 = model.f1, model.f2

    def forward(self, x):
        lab = lab_input(x)
        return torch.cat([self.f1(lab[:, :1]), self.f2(lab[:, 1:])], dim=1)


def decode(out1, out2, bins, args):
    """Predictions -> (ab in Lab units, L in [0, 100]) at the heads' resolution."""
    if args.loss == "classification":  # the most likely bin
        ab = bins.to(out1)[out1.argmax(1)].permute(0, 3, 1, 2)
        L = (out2.argmax(1, keepdim=True).float() + 0.5) * 100 / args.l_bins
    else:
        ab, L = out1 * 100, (out2 + 1) * 50
    return ab, L


@torch.no_grad()
def test_errors(model, dataset, bins, args, device, batch_size=256) -> dict:
    """On the test split: mean absolute errors of the decoded ab (from L) and L (from ab),
    beside what a constant guess gets (grey, ab = 0; the split's mean L). With the
    classification loss also each half's cross-entropy against its soft targets, beside
    the best constant guess's: the targets' mean distribution, whose cross-entropy is
    -sum_q mean(Z)_q log mean(Z)_q. The decoded mode can miss where the distribution is
    broad; the cross-entropy is what each half learns."""
    model.eval()
    ab_err = l_err = count = 0.0
    truth, xent, mean_target = [], {"ab": 0.0, "L": 0.0}, {}
    table, L_bins = bin_table(bins), l_centres(args.l_bins).to(device)
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x = common.to_float(images, device)
        out1, out2 = model(lab_input(x))
        ab_hat, L_hat = decode(out1, out2, bins, args)
        lab = F.adaptive_avg_pool2d(common.rgb_to_lab(x), ab_hat.shape[-2:])
        ab_err += (ab_hat - lab[:, 1:]).abs().mean().item() * len(x)
        l_err += (L_hat - lab[:, :1]).abs().mean().item() * len(x)
        if args.loss == "classification":
            for name, out, (near, Z) in (("ab", out1, soft_targets(lab[:, 1:], bins, sigma=GRID / 2, table=table)),
                                         ("L", out2, soft_targets(lab[:, :1], L_bins, sigma=50 / args.l_bins))):
                xent[name] += soft_cross_entropy(out, near, Z).item() * len(x)
                dense = torch.zeros_like(out).scatter_(1, near, Z)  # the targets written out, (N, Q, h, w)
                mean_target[name] = mean_target.get(name, 0) + dense.mean((2, 3)).sum(0)
        count += len(x)
        truth.append(lab)
    model.train()
    lab = torch.cat(truth)
    results = {"pretext_ab_error": ab_err / count, "pretext_L_error": l_err / count,
               "pretext_ab_error_grey_guess": lab[:, 1:].abs().mean().item(),
               "pretext_L_error_mean_guess": (lab[:, :1] - lab[:, :1].mean()).abs().mean().item()}
    for name, total in mean_target.items():
        p = total / count
        results[f"pretext_{name}_xent"] = xent[name] / count
        results[f"pretext_{name}_xent_constant"] = -(p * p.clamp(min=1e-12).log()).sum().item()
    return results


@torch.no_grad()
def save_grid(model, dataset, bins, args, device, path, n: int = 8):
    """Rows: original; L with F1's ab (L -> ab); true ab at L = 50 (F2's input); F2's L with the true ab."""
    n = min(n, len(dataset))  # a test split may be smaller than a row
    x = common.to_float(torch.stack([dataset[i][0] for i in range(n)]), device)
    was_training = model.training
    model.eval()
    lab = common.rgb_to_lab(x)
    ab_hat, L_hat = decode(*model(lab_input(x)), bins, args)
    size = x.shape[-2:]
    ab_hat, L_hat = F.interpolate(ab_hat, size=size, mode="bilinear"), F.interpolate(L_hat, size=size, mode="bilinear")
    rows = [x, common.lab_to_rgb(torch.cat([lab[:, :1], ab_hat], 1)),
            common.lab_to_rgb(torch.cat([torch.full_like(lab[:, :1], 50), lab[:, 1:]], 1)),
            common.lab_to_rgb(torch.cat([L_hat, lab[:, 1:]], 1))]
    model.train(was_training)
    common.save_picture(path, torch.cat(rows), nrow=n)


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
