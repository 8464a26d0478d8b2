"""Predict the relative location of two patches: lecture 13, pretext task 2.

Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015. Lay a 3x3 grid of patches anywhere in the image and take
its centre patch and one of the 8 neighbours; the network sees the two and
predicts which of the 8 positions the neighbour came from. Two branches with tied weights (one
backbone) embed the patches; their features are concatenated and a small head
classifies. Shortcuts the paper closes: a gap between patches (half a patch) and
a random jitter of each (edges and lines cannot simply be continued), the grid
landing anywhere (a neighbour's place in the image does not give its label
away), and chromatic aberration, closed by colour dropping (the released
code's) or by projecting out green-magenta. The released code also normalises
each patch on its own and downsamples a third of them at random; so does this.

    python patch_location.py                          # built-in shapes at 80 px
    python patch_location.py --chroma project         # the paper's other remedy (or none)
    python patch_location.py --gap 0 --jitter 0 --downsample 0   # without the gap, the jitter and the downsampling
    python patch_location.py --dataset folder --data-dir data/cifar10-jpg --image-size 40 --patch 8 --gap 4 --jitter 1

Departures from the paper (docs/patch_location.md, with their measured effects):
- Scaled down: 16 px patches in 80 px images (the paper: 96 px patches in images of
  390-670 px a side, about the same share of the side), gap and jitter in proportion.
- Photos are kept with their shorter side at --image-size, not rescaled at random to
  150k-450k px as the paper's. Not measured.
- Head: one hidden layer on the two concatenated features, where the paper has fc6 per
  branch, then fc7 and fc8 (AlexNet). Not measured against the paper's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    # Photos: whole images kept with their shorter side at --image-size (--load-size overrides),
    # not cropped: the patches come from anywhere in the whole image, as the paper samples
    # them from images of 150k-450k px, where a 96 px patch is about a fifth of the side.
    LOAD_SCALE: ClassVar[float] = 1.0
    image_size: int = 80  # paper: images of 150k-450k px (about 390-670 px a side); the grid fills 82% of the side, as there
    epochs: int = 80  # sized for the 3-minute CPU budget on the built-in data (16 px patches are cheap)
    batch_size: int = 128  # patch pairs per step (paper: 128)
    lr: float = 0.05  # SGD peak lr; warm-up, then cosine decay
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    patch: int = 16  # patch side in px (paper: 96, about a fifth of the image side, as here: 16 of 80)
    gap: int = 8  # gap between neighbouring patches, px (paper: 48, half a patch)
    jitter: int = 1  # each patch moves up to this many px in x and y (paper: up to 7 of 96, 7%)
    chroma: str = "drop"  # against chromatic aberration: drop (colour dropping, the released code's) | project (the paper's other remedy) | none
    downsample: float = 0.33  # fraction of patches downsampled to as little as 1% of their pixels and upsampled (released code: 1/3)


# ---------------------------------------------------------------------------
# Pretext data: centre patch, a neighbour, and where the neighbour sits
# ---------------------------------------------------------------------------
# Label k -> (row, column) of the neighbour in the 3x3 grid around the centre patch, at (1, 1).
POSITIONS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))


def grid_span(patch: int, gap: int, jitter: int) -> int:
    """Smallest image side that holds the whole jittered 3x3 grid: 3 x patch + 2 x gap + 2 x jitter."""
    return 3 * patch + 2 * gap + 2 * jitter


def sample_pairs(images: torch.Tensor, patch: int, gap: int, jitter: int, sizes: torch.Tensor | None = None):
    """Centre patches (N, C, p, p), neighbour patches (N, C, p, p) and labels (N,) in 0..7.

    As the paper (sec. 3): the 3x3 grid (`patch` px cells, `gap` px apart) is placed
    uniformly anywhere it fits in the image, and only then is the label drawn: one of
    the centre's 8 neighbours, whatever the grid's place. So where the patches sit says
    nothing about the label (tests: the positional shortcut stays at chance). Each of
    the two patches then moves by its own random offset in [-jitter, jitter] in x and y.
    `images` (N, C, H, W); with `sizes` (N, 2), image i is its top-left sizes[i] (photos
    of different sizes in one padded batch), and the grid lands anywhere inside it, as the
    paper samples from the whole image. Also returns the patches' top-left corners
    (N, 2, 2: centre/neighbour, y/x) for the tests."""
    n, c, h, w = images.shape
    dev = images.device
    sizes = sizes.to(dev) if sizes is not None else torch.tensor([[h, w]], device=dev)
    if int(sizes.min()) < grid_span(patch, gap, jitter):
        raise ValueError(f"images of {tuple(sizes.min(0).values.tolist())} px cannot hold a 3x3 grid of {patch} px "
                         f"patches {gap} px apart with jitter {jitter}")
    step = patch + gap
    room = sizes - grid_span(patch, gap, jitter) + 1  # places for the grid in y and x: (1 or N, 2)
    origin = jitter + (torch.rand(n, 2, device=dev) * room).long()  # the grid's top-left cell, uniform
    labels = torch.randint(0, 8, (n,), device=dev)  # then the neighbour, apart from where the grid is
    offset = torch.tensor(POSITIONS, device=dev)[labels] - 1  # (N, 2): the neighbour's cell - the centre's, in -1..1
    centre = origin + step  # the middle cell
    corners = torch.stack([centre, centre + offset * step], dim=1)  # (N, 2, 2): centre, neighbour
    corners = corners + torch.randint(-jitter, jitter + 1, corners.shape, device=dev)  # independent jitter
    r = torch.arange(patch, device=dev)
    rows = corners[:, :, None, :1, None] + r.view(-1, 1)  # (N, 2, 1, p, 1): centre's, neighbour's
    cols = corners[:, :, None, 1:, None] + r  # (N, 2, 1, 1, p)
    plane = (torch.arange(n, device=dev).view(n, 1, 1, 1, 1) * c + torch.arange(c, device=dev).view(1, 1, c, 1, 1))
    # Pixel (y, x) of channel ch of image b by its flat index: one gather (take), faster on a CPU
    # than indexing with three index tensors.
    pairs = images.reshape(-1).take(plane * (h * w) + rows * w + cols).float()  # (N, 2, C, p, p)
    if images.dtype == torch.uint8:  # cut from uint8 pixels: float in [0, 1], as a float batch's
        pairs.div_(255)
    return pairs[:, 0], pairs[:, 1], labels, corners


def drop_colour(x: torch.Tensor) -> torch.Tensor:
    """Keep one random channel per patch and replace the other two by Gaussian noise of
    1/100 of the kept channel's std (paper sec. 3.1, "color dropping")."""
    n = len(x)
    keep = torch.randint(0, 3, (n,), device=x.device)
    kept = x[torch.arange(n, device=x.device), keep].unsqueeze(1)  # (N, 1, p, p)
    noise = torch.randn_like(x) * kept.std((2, 3), keepdim=True) / 100 + kept.mean((2, 3), keepdim=True)
    mask = F.one_hot(keep, 3).view(n, 3, 1, 1).to(x.dtype)
    return torch.lerp(noise, x, mask)  # torch.where(mask, x, noise) as a lerp by 0 or 1: the same values, faster on a CPU


GREEN_MAGENTA = torch.tensor([-1.0, 2.0, -1.0]) / 6 ** 0.5


def project_colour(x: torch.Tensor) -> torch.Tensor:
    """Remove each pixel's green-magenta component (paper sec. 3.1, "projection"),
    leaving colours on the plane orthogonal to (-1, 2, -1)."""
    a = GREEN_MAGENTA.to(x).view(1, 3, 1, 1)
    return x - (x * a).sum(1, keepdim=True) * a


def downsample_some(patches: tuple[torch.Tensor, ...], p: float) -> tuple[torch.Tensor, ...]:
    """A fraction p of the patches resized down and back up (bilinear), to between about
    10 and 99 of every 96 px on a side: from 1% of their pixels to all. The released code
    does this to a third of its 96 px patches (as few as 100 pixels), so that the network
    cannot tell neighbours by their shared sharpness or pixel grain. `patches`: tensors
    (N, C, s, s) of one patch size (the centres, the neighbours), each patch drawn on its
    own; each tensor is resized in one product (down_up), the patches not chosen by the
    identity (exact: their pixels times 1 plus zeros)."""
    side = patches[0].shape[-1]
    resizes = []
    for x in patches:
        n = len(x)
        chosen = torch.rand(n, device=x.device) < p
        area = torch.rand(n, device=x.device) * ((95 / 96) ** 2 - (10 / 96) ** 2) + (10 / 96) ** 2  # uniform in area
        sides = (area.sqrt() * side).long().clamp(min=1)
        resizes.append(torch.where(chosen, sides, 0))  # M[0] = identity: not chosen
    m = down_up(side, patches[0].device).to(patches[0].dtype)
    return tuple(m[s].unsqueeze(1) @ x @ m[s].unsqueeze(1).transpose(-1, -2) for x, s in zip(patches, resizes))


@functools.lru_cache
def down_up(side: int, device: torch.device) -> torch.Tensor:
    """M (side + 1, side, side): M[s] @ X @ M[s].T is the side x side patch X resized to
    s x s (F.interpolate, bilinear, antialiased) and back (bilinear), for s in 1..side;
    M[0] is the identity. Both resizes are separable, a 1-d resize along each axis, so each
    is a matrix on either side of X; M[s] = up @ down, computed once (in float64)."""
    eye, m = torch.eye(side, dtype=torch.float64), [torch.eye(side, dtype=torch.float64)]
    for s in range(1, side + 1):
        down = F.interpolate(eye.view(side, 1, 1, side), size=(1, s), mode="bilinear", antialias=True,
                             align_corners=False).view(side, s).T  # (s, side): row k, output pixel k
        up = F.interpolate(torch.eye(s, dtype=torch.float64).view(s, 1, 1, s), size=(1, side), mode="bilinear",
                           align_corners=False).view(s, side).T  # (side, s)
        m.append(up @ down)
    return torch.stack(m).to(device)


def normalize_patches(x: torch.Tensor) -> torch.Tensor:
    """Each patch (N, C, p, p) with the mean of each of its channels removed, then divided by
    its root mean square over all channels (the released code), so that neighbours cannot be
    matched by their brightness or contrast."""
    x = x - x.mean((2, 3), keepdim=True)
    return x / (x.square().mean((1, 2, 3), keepdim=True).sqrt() + 1e-3)


def prepare_patches(images, args, train: bool = True, sizes=None):
    """Pairs as the network sees them: sampled (from each image's own `sizes` in a padded
    batch of photos), downsampled at random (training only), colour dropped or projected,
    each patch normalised on its own."""
    centre, neighbour, labels, _ = sample_pairs(images, args.patch, args.gap, args.jitter, sizes)
    if train and args.downsample:
        centre, neighbour = downsample_some((centre, neighbour), args.downsample)
    if args.chroma == "drop":
        centre, neighbour = drop_colour(centre), drop_colour(neighbour)
    elif args.chroma == "project":
        centre, neighbour = project_colour(centre), project_colour(neighbour)
    return normalize_patches(centre), normalize_patches(neighbour), labels


# ---------------------------------------------------------------------------
# Model: tied branches, concatenated, a small classification head
# ---------------------------------------------------------------------------
class PatchLocationNet(nn.Module):
    def __init__(self, backbone: nn.Module, width: int):
        super().__init__()
        self.backbone = backbone  # both branches: the same module, so the weights are tied
        # paper: fc6 per branch, concatenated, fc7, fc8 (8-way); here one hidden layer
        self.head = nn.Sequential(nn.Linear(2 * width, 256), nn.ReLU(inplace=True), nn.Linear(256, 8))

    def forward(self, centre, neighbour):  # (N, 3, p, p) each, normalised per patch -> logits (N, 8)
        feats = self.backbone(torch.cat([centre, neighbour]))  # one pass: 2N x width
        f_centre, f_neighbour = feats.chunk(2)
        return self.head(torch.cat([f_centre, f_neighbour], dim=1))  # concatenated: N x 2 width


# ---------------------------------------------------------------------------
# Loss: the cross-entropy over the 8 positions
# ---------------------------------------------------------------------------
def position_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of the 8-way classifier over where the neighbour sits (paper sec. 3)."""
    return F.cross_entropy(logits, y)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def train(args: Args):
    if args.chroma not in ("drop", "project", "none"):
        common.fail(f"--chroma must be drop, project or none, not {args.chroma}")
    if args.downsample > 1:
        common.fail(f"--downsample is a fraction of the patches, at most 1, not {args.downsample}")
    if args.patch < 8 or args.gap < 0 or args.jitter < 0:
        common.fail("--patch must be at least 8, and --gap and --jitter at least 0")
    common.check_image_size(args, grid_span(args.patch, args.gap, args.jitter),
                            f"a 3x3 grid of {args.patch} px patches with gap {args.gap} and jitter {args.jitter} "
                            f"(3 x patch + 2 x gap + 2 x jitter)")
    run = common.Run(args, "patch_location")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    backbone, width = common.build_backbone(args.backbone, args.patch)
    model = run.prepare(PatchLocationNet(backbone, width))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay, fused=run.fused)

    total_steps = args.epochs * len(loader)
    warmup = int(args.warmup_epochs * len(loader))
    parts = {"model": model, "optimizer": optimizer}
    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: PatchNormalizedEncoder(net.backbone))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr, warmup))
        # uint8 pixels: only the patches cut from them become floats (sample_pairs), a tenth of
        # the pixels. Photos stay whole (WholeImages): the grid lands anywhere in each.
        pixels, sizes = (images.pixels, images.sizes) if isinstance(images, common.WholeImages) else (images, None)
        pixels, sizes = pixels.to(run.device, non_blocking=True), sizes if sizes is None else sizes.to(run.device)
        centre, neighbour, y = prepare_patches(pixels, args, sizes=sizes)  # (N, 3, p, p) x 2, (N,): the free labels
        with run.autocast():
            logits = model(run.format(centre), run.format(neighbour))  # (N, 8)
            loss = position_loss(logits.float(), y)
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        acc = (logits.argmax(1) == y).float().mean()
        run.log(len(images), loss=loss.item(), acc=acc.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    run.save_encoder(net.backbone)
    if not run.is_main:
        return run.close()
    results = {"pretext_top1": pretext_accuracy(net, data.test, args, run.device), "steps": run.step}
    run.print(f"position accuracy on the test split: {results['pretext_top1']:.4f} (chance 0.1250)")
    return run.finish(results, data, PatchNormalizedEncoder(net.backbone),
                      lambda: PatchNormalizedEncoder(common.build_backbone(args.backbone, args.patch)[0]))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, and the position accuracy
# ---------------------------------------------------------------------------
class PatchNormalizedEncoder(nn.Module):
    """What the evaluation protocol sees: whole RGB images in [0, 1], each normalised as
    the patches were during training (normalize_patches), -> backbone features."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(normalize_patches(x))



@torch.no_grad()
def pretext_accuracy(model, dataset, args, device, batch_size=512) -> float:
    """8-way position accuracy on held-out images."""
    model.eval()
    correct = total = 0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        centre, neighbour, labels = prepare_patches(common.to_float(images, device), args, train=False)
        correct += (model(centre, neighbour).argmax(1) == labels).sum().item()
        total += len(labels)
    model.train()
    return correct / total


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
