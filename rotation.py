"""Predict image rotations: lecture 13, pretext task 1.

Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting
Image Rotations", ICLR 2018. Every image is rotated by 0, 90, 180 and 270
degrees, all four copies go into the same batch, and one ConvNet classifies
which rotation was applied (4-way cross-entropy). To tell "up" the network
must recognise objects and where their parts are. Afterwards only the ConvNet
(the backbone) is kept, and the rotation head is thrown away.

    python rotation.py                                  # built-in shapes
    python rotation.py --angles 8                       # the paper's 2 / 4 / 8 angle comparison
    python rotation.py --dataset folder --data-dir data/cifar10-jpg --epochs 10
    torchrun --nproc_per_node=2 rotation.py --dataset cifar10 --backbone resnet18 --epochs 100
    python rotation.py --resume runs/rotation-20260101-120000   # continue a stopped run

Departures from the paper (docs/rotation.md):
- Backbone: a ResNet (the small one by default) instead of a Network-In-Network, with a
  linear rotation head on its pooled features, so what is learned sits in the backbone
  that is evaluated. Epochs, image size and width are scaled down (Args).
- Schedule: a short warm-up, then cosine decay, instead of steps at epochs 30, 60, 80.
  Neither departure is measured against the paper's choice.
- 8 angles: every copy is cut to its inscribed disc, else the empty corners of the
  45-degree copies would give their label away (the paper does not say how it avoids them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    angles: int = 4  # 2 (0/180), 4 (multiples of 90) or 8 (multiples of 45); paper sec. 3.2: 4 is best
    epochs: int = 6  # paper: 100 epochs on CIFAR-10; 6 fit the 3-minute CPU budget on the built-in data
    batch_size: int = 128  # images per step; each step sees angles x this many rotated views (paper: 128)
    lr: float = 0.1  # paper: 0.1 with SGD, batch 128
    weight_decay: float = 5e-4  # paper: 5e-4
    warmup_epochs: float = 0.5  # linear warm-up, then cosine decay (paper: step decay at epochs 30/60/80)
    min_crop: float = 0.08  # photos: smallest crop, a fraction of the area (released code, ImageNet: RandomSizedCrop, 0.08)


# ---------------------------------------------------------------------------
# Pretext data: the rotated copies and their free labels
# ---------------------------------------------------------------------------
def rotate_batch(x: torch.Tensor, num_angles: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """All rotations of each image, counter-clockwise, stacked angle by angle.

    x: (N, C, H, W), square. Returns (num_angles * N, C, H, W) and labels
    (num_angles * N,): rows [k*N, (k+1)*N) hold every image rotated by angle k.
    4 angles: k * 90 degrees (exact, torch.rot90). 2 angles: 0 and 180 (the
    paper's better pair, Table 2). 8 angles: k * 45 degrees; the 45-degree
    copies are resampled bilinearly, and every copy (including the exact ones)
    is cut to the inscribed disc, else the empty corners of the 45-degree copies
    would give their label away."""
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"rotation needs square images, got {h}x{w}")
    if num_angles == 2:
        views = [x, torch.rot90(x, 2, dims=(2, 3))]
    elif num_angles == 4:
        views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    elif num_angles == 8:
        half = _rotate(x, 45.0)
        views = [torch.rot90(half if k % 2 else x, k // 2, dims=(2, 3)) for k in range(8)]
        disc = _disc(h, x.device, x.dtype)
        views = [v * disc for v in views]
    else:
        raise ValueError(f"num_angles must be 2, 4 or 8, not {num_angles}")
    labels = torch.arange(num_angles, device=x.device).repeat_interleave(n)
    return torch.cat(views), labels


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate counter-clockwise (as displayed) about the centre, bilinear."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # affine_grid maps output to input coordinates (y points down): the inverse rotation.
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], device=x.device, dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _disc(size: int, device, dtype) -> torch.Tensor:
    r = (torch.arange(size, device=device, dtype=dtype) + 0.5 - size / 2)
    return ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= (size / 2) ** 2).to(dtype)


# ---------------------------------------------------------------------------
# Model: shared backbone + rotation head
# ---------------------------------------------------------------------------
class RotationNet(nn.Module):
    """One ConvNet for all rotated copies (shared weights), then a linear rotation classifier.

    The paper's head is the rest of a NIN (its later blocks); a linear layer on
    the pooled backbone features keeps the learned features in the backbone,
    which is the part evaluated downstream."""

    def __init__(self, backbone: nn.Module, width: int, num_angles: int, normalize: nn.Module = nn.Identity()):
        super().__init__()
        self.normalize = normalize  # train() passes common.Normalize(): the ImageNet mean and std
        self.backbone = backbone
        self.head = nn.Linear(width, num_angles)

    def forward(self, x):  # x: (B, 3, H, W) in [0, 1] -> rotation logits (B, num_angles)
        return self.head(self.backbone(self.normalize(x)))


# ---------------------------------------------------------------------------
# Loss: the cross-entropy over rotations (paper eq. 1-2)
# ---------------------------------------------------------------------------
def rotation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """loss(X_i) = -1/K sum_y log F^y(g(X_i, y)): the cross-entropy of the rotation
    classifier, averaged over the K rotated copies of every image (paper eq. 1-2)."""
    return F.cross_entropy(logits, y)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def augment(x, args: Args) -> torch.Tensor:
    """The released code's augmentation, before the rotations. Photos (whole images, kept
    at --load-size): a random resized crop of --min-crop to all of the area, flipped at
    random, its ImageNet recipe (RandomSizedCrop(224), RandomHorizontalFlip). Images that
    are --image-size squares already (the built-in shapes, CIFAR-10): a random crop after
    4 px of padding, flipped at random, its CIFAR recipe."""
    if isinstance(x, common.WholeImages):
        return common.random_resized_crop(x, scale=(args.min_crop, 1.0), size=args.image_size)
    return common.random_crop_flip(x)


def train(args: Args):
    if args.angles not in (2, 4, 8):
        common.fail(f"--angles must be 2, 4 or 8, not {args.angles}")
    common.check_image_size(args, 16, "rotation with the backbone's 16x downsampling")
    run = common.Run(args, "rotation")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    backbone, width = common.build_backbone(args.backbone, args.image_size)
    model = run.prepare(RotationNet(backbone, width, args.angles, common.Normalize()))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay, fused=run.fused)

    total_steps = args.epochs * len(loader)
    warmup = int(args.warmup_epochs * len(loader))
    parts = {"model": model, "optimizer": optimizer}
    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: encoder_of(net.backbone, args.angles))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr, warmup))
        x = augment(run.to_device(images), args)  # the released code's crop and flip
        x, y = rotate_batch(x, args.angles)  # x: (angles*N, 3, H, W), y: (angles*N,)
        with run.autocast():
            logits = model(run.format(x))  # (angles*N, angles)
            loss = rotation_loss(logits.float(), y)
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        acc = (logits.argmax(1) == y).float().mean()
        run.log(len(images), loss=loss.item(), acc=acc.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    run.save_encoder(net.backbone)
    if not run.is_main:
        return run.close()
    results = {"pretext_top1": pretext_accuracy(net, data.test, args.angles, run.device), "steps": run.step}
    run.print(f"rotation accuracy on the test split: {results['pretext_top1']:.4f} (chance {1 / args.angles:.4f})")
    return run.finish(results, data, encoder_of(net.backbone, args.angles),
                      lambda: encoder_of(common.build_backbone(args.backbone, args.image_size)[0], args.angles))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, and the rotation accuracy
# ---------------------------------------------------------------------------
class DiscCut(nn.Module):
    """Images cut to their inscribed disc, as every view of the 8-angle task is."""

    def forward(self, x):
        return x * _disc(x.shape[-1], x.device, x.dtype)


def encoder_of(backbone: nn.Module, num_angles: int = 4) -> nn.Module:
    """What the evaluation protocol sees: RGB in [0, 1] -> backbone features. The 8-angle
    network was trained on discs only, so it is evaluated on discs too (its random-init
    baseline as well); a square's corners would be inputs it never saw."""
    cut = [DiscCut()] if num_angles == 8 else []
    return nn.Sequential(*cut, common.Normalize(), backbone)


@torch.no_grad()
def pretext_accuracy(model: nn.Module, dataset, num_angles: int, device, batch_size: int = 256) -> float:
    """Rotation accuracy on held-out images, no augmentation."""
    model.eval()
    correct = total = 0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x, y = rotate_batch(common.to_float(images, device), num_angles)
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train()
    return correct / total


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
