"""Predict the relative location of two patches: lecture 13, pretext task 2.

Doersch, Gupta, Efros, "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015. Lay a 3x3 grid of patches on the image; give the
network the centre patch and one of its 8 neighbours; it predicts which of the
8 positions the neighbour came from. Two branches with tied weights (one
backbone) embed the patches; their features are concatenated and a small head
classifies. Shortcuts the paper closes: a gap between patches and a random
jitter of each (edges and lines cannot simply be continued), and chromatic
aberration, closed by colour dropping or by projecting out green-magenta.

    python patch_location.py                          # built-in shapes at 64 px, ~3 min on 2 CPU cores
    python patch_location.py --chroma drop            # colour dropping (or project, none; default: auto)
    python patch_location.py --gap 0 --jitter 0       # ... and the gap and jitter
    python patch_location.py --dataset folder --data-dir /tmp/cifar10-jpg --image-size 32 --patch 8 --gap 4 --jitter 1
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    image_size: int = 64  # the grid needs room: 3 x patch + 2 x gap + 2 x jitter px (paper: images of ~150k-450k px)
    epochs: int = 40  # sized for the 3-minute CPU budget on the built-in data (16 px patches are cheap: ~90 s)
    batch_size: int = 128  # patch pairs per step (paper: 128); 256 learned less in the same time (README)
    lr: float = 0.05  # SGD peak lr; warm-up, then cosine decay
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    patch: int = 16  # patch side in px (paper: 96)
    gap: int = 6  # gap between neighbouring patches, px (paper: 48, half a patch; 8 would not fit 64 px)
    jitter: int = 2  # each patch moves up to this many px in x and y (paper: up to 7)
    chroma: str = "auto"  # against chromatic aberration: project | drop | none | auto (none on the built-in shapes, else project)


# ---------------------------------------------------------------------------
# Pretext data: centre patch, a neighbour, and where the neighbour sits
# ---------------------------------------------------------------------------
# Label k -> (row, column) of the neighbour in the 3x3 grid; the centre is (1, 1).
POSITIONS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))


def grid_span(patch: int, gap: int, jitter: int) -> int:
    """Smallest image side that holds the jittered 3x3 grid."""
    return 3 * patch + 2 * gap + 2 * jitter


def sample_pairs(images: torch.Tensor, patch: int, gap: int, jitter: int):
    """Centre patches (N, C, p, p), neighbour patches (N, C, p, p) and labels (N,) in 0..7.

    The grid (cells of `patch` px, `gap` px apart) is placed at a random position in
    each image; each of the two patches then moves by its own random offset in
    [-jitter, jitter] in x and y. Also returns the patches' top-left corners
    (N, 2, 2: centre/neighbour, y/x) so tests can check the geometry."""
    n, _, h, w = images.shape
    if min(h, w) < grid_span(patch, gap, jitter):
        raise ValueError(f"images of {h}x{w} px cannot hold a grid of 3 x {patch} px patches, gap {gap}, jitter {jitter}")
    dev = images.device
    step = patch + gap
    span = 3 * patch + 2 * gap
    oy = torch.randint(jitter, h - span - jitter + 1, (n,), device=dev)  # grid origin, room for jitter
    ox = torch.randint(jitter, w - span - jitter + 1, (n,), device=dev)
    labels = torch.randint(0, 8, (n,), device=dev)
    pos = torch.tensor(POSITIONS, device=dev)[labels]  # (N, 2): row, column of the neighbour
    cells = torch.stack([torch.ones_like(pos), pos], dim=1)  # (N, 2, 2): centre (1, 1), neighbour
    corners = torch.stack([oy, ox], dim=1).unsqueeze(1) + cells * step
    corners = corners + torch.randint(-jitter, jitter + 1, corners.shape, device=dev)  # independent jitter
    batch = torch.arange(n, device=dev).view(n, 1, 1)
    r = torch.arange(patch, device=dev)
    hwc = images.permute(0, 2, 3, 1)
    centre, neighbour = (hwc[batch, corners[:, i, 0].view(n, 1, 1) + r.view(1, -1, 1),
                             corners[:, i, 1].view(n, 1, 1) + r.view(1, 1, -1)].permute(0, 3, 1, 2)
                         for i in (0, 1))
    return centre.contiguous(), neighbour.contiguous(), labels, corners


def drop_colour(x: torch.Tensor) -> torch.Tensor:
    """Keep one random channel per patch and replace the other two by Gaussian noise of
    1/100 of the kept channel's std (paper sec. 3.1, "color dropping")."""
    n = len(x)
    keep = torch.randint(0, 3, (n,), device=x.device)
    kept = x[torch.arange(n, device=x.device), keep].unsqueeze(1)  # (N, 1, p, p)
    noise = torch.randn_like(x) * kept.std((2, 3), keepdim=True) / 100 + kept.mean((2, 3), keepdim=True)
    mask = F.one_hot(keep, 3).view(n, 3, 1, 1).bool()
    return torch.where(mask, x, noise)


GREEN_MAGENTA = torch.tensor([-1.0, 2.0, -1.0]) / 6 ** 0.5


def project_colour(x: torch.Tensor) -> torch.Tensor:
    """Remove each pixel's green-magenta component (paper sec. 3.1, "projection"),
    leaving colours on the plane orthogonal to (-1, 2, -1)."""
    a = GREEN_MAGENTA.to(x).view(1, 3, 1, 1)
    return x - (x * a).sum(1, keepdim=True) * a


def prepare_patches(images, args):
    centre, neighbour, labels, _ = sample_pairs(images, args.patch, args.gap, args.jitter)
    if args.chroma == "drop":
        centre, neighbour = drop_colour(centre), drop_colour(neighbour)
    elif args.chroma == "project":
        centre, neighbour = project_colour(centre), project_colour(neighbour)
    return centre, neighbour, labels


# ---------------------------------------------------------------------------
# Model: tied branches, concatenated, a small classification head
# ---------------------------------------------------------------------------
class PatchLocationNet(nn.Module):
    def __init__(self, backbone: nn.Module, width: int):
        super().__init__()
        self.normalize = common.Normalize()
        self.backbone = backbone  # both branches: the same module, so the weights are tied
        # paper: fc6 per branch, concatenated, fc7, fc8 (8-way); here one hidden layer
        self.head = nn.Sequential(nn.Linear(2 * width, 256), nn.ReLU(inplace=True), nn.Linear(256, 8))

    def forward(self, centre, neighbour):  # (N, 3, p, p) each -> logits (N, 8)
        feats = self.backbone(self.normalize(torch.cat([centre, neighbour])))  # one pass: 2N x width
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
    if args.chroma not in ("drop", "project", "none", "auto"):
        common.fail(f"--chroma must be drop, project, none or auto, not {args.chroma}")
    if args.chroma == "auto":  # rendered shapes have no chromatic aberration to hide; photos do
        args.chroma = "none" if args.dataset == "shapes" else "project"
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
                                weight_decay=args.weight_decay)

    total_steps = args.epochs * len(loader)
    warmup = int(args.warmup_epochs * len(loader))
    parts = {"model": model, "optimizer": optimizer}
    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: encoder_of(net.backbone))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr, warmup))
        centre, neighbour, y = prepare_patches(run.to_device(images), args)  # (N, 3, p, p) x 2, (N,)
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
    return run.finish(results, data, encoder_of(net.backbone),
                      lambda: encoder_of(common.build_backbone(args.backbone, args.patch)[0]))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, and the position accuracy
# ---------------------------------------------------------------------------
def encoder_of(backbone: nn.Module) -> nn.Module:
    """What the evaluation protocol sees: whole RGB images in [0, 1] -> backbone features."""
    return nn.Sequential(common.Normalize(), backbone)


@torch.no_grad()
def pretext_accuracy(model, dataset, args, device, batch_size=512) -> float:
    """8-way position accuracy on held-out images."""
    model.eval()
    correct = total = 0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        centre, neighbour, labels = prepare_patches(common.to_float(images, device), args)
        correct += (model(centre, neighbour).argmax(1) == labels).sum().item()
        total += len(labels)
    model.train()
    return correct / total


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
