"""Context encoders, feature learning by inpainting: lecture 13, pretext task 4.

Pathak, Krähenbühl, Donahue, Darrell, Efros, "Context Encoders: Feature
Learning by Inpainting", CVPR 2016. Drop a region of the image; an
encoder-decoder fills it in from the context. The encoder (the backbone) is
the feature extractor kept afterwards. The loss is a reconstruction term on
the missing region, L_rec = || M * (x - F((1 - M) * x)) ||^2, plus, as the
lecture stresses, an adversarial term that makes the fill sharper:
L = lambda_rec * L_rec + lambda_adv * L_adv with 0.999 and 0.001. The paper
learned the features it evaluates with L_rec alone and random-region holes
(`--adv-weight 0`, with the default holes); the default keeps the lecture's loss.

    python inpainting.py                              # built-in shapes; grid.png in the run folder
    python inpainting.py --adv-weight 0               # reconstruction only: compare the grids (the lecture's claim)
    python inpainting.py --mask center                # or blocks: the paper's other two kinds of hole
    python inpainting.py --dataset folder --data-dir data/cifar10-jpg --epochs 5

Departures from the paper (docs/inpainting.md, with their measured effects):
- The loss: 0.999 L_rec + 0.001 L_adv by default, the lecture's and the paper's loss for
  inpainting, where the paper learned the features it evaluates with L_rec alone
  (--adv-weight 0). Measured against it in docs/inpainting.md (inpainting_adversarial).
- Random holes: L_rec is the squared error over the whole output, the context weighted
  as the hole (--context-weight 1), as the released code trains them; the paper's eq. 1
  counts the hole only (--context-weight 0). The discriminator judges the whole output
  there, so without it the context it sees would be trained by L_adv alone.
- --mask region: a random smooth blob of a quarter of the image stands in for the
  paper's shapes of PASCAL segments.
- Networks: the encoder is a ResNet backbone (the paper: AlexNet), the decoder and the
  discriminator are small; no 10x weight on a band around the central hole (released
  code). Not measured against the paper's.
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
    # Photos: whole images kept with their shorter side at 350/128 of --image-size, as the
    # released code keeps them at 350 px for its random 128 px crops (--load-size overrides).
    LOAD_SCALE: ClassVar[float] = 350 / 128
    epochs: int = 12  # sized for the 3-minute CPU budget on the built-in data
    batch_size: int = 128  # paper: 64
    lr: float = 1e-3  # Adam for the context encoder; the discriminator gets a tenth (paper: 10x lower for D)
    mask: str = "region"  # the hole: region (a random blob, as the paper's features were learned with) | blocks (random squares) | center (one central square); paper sec. 3.3
    hole: float = 0.5  # side of the central square as a fraction of the image side (paper: 64 of 128 px)
    rec_weight: float = 0.999  # lambda_rec (paper: 0.999)
    adv_weight: float = 0.001  # lambda_adv (paper: 0.001); 0: the reconstruction loss alone, with which the paper learned its features
    context_weight: float = 1.0  # random holes: weight of the context in L_rec beside 1 in the hole (released code: 1, L2 over the whole output); 0: the hole only


# ---------------------------------------------------------------------------
# Pretext data: the hole, and the image with it
# ---------------------------------------------------------------------------
def make_masks(n: int, size: int, kind: str, hole: float, device="cpu") -> torch.Tensor:
    """Masks (N, 1, size, size), 1 where the image is dropped.

    center: a centred square of side hole * size. blocks: four squares of half that
    side at random places (they may overlap), as the paper's "random block". region:
    a random smooth blob covering a quarter of the image, standing in for the paper's
    masks taken from PASCAL segmentations (sec. 3.3)."""
    side = max(1, round(hole * size))
    if kind == "center":
        m = torch.zeros(n, 1, size, size, device=device)
        top = (size - side) // 2
        m[:, :, top:top + side, top:top + side] = 1
        return m
    if kind == "blocks":
        b = max(1, side // 2)
        r = torch.arange(size, device=device)
        m = torch.zeros(n, 1, size, size, device=device)
        for _ in range(4):
            oy, ox = (torch.randint(0, size - b + 1, (2, n, 1, 1), device=device))
            inside = ((r.view(1, -1, 1) >= oy) & (r.view(1, -1, 1) < oy + b) &
                      (r.view(1, 1, -1) >= ox) & (r.view(1, 1, -1) < ox + b))
            m = torch.maximum(m, inside.unsqueeze(1).float())
        return m
    if kind == "region":
        noise = F.interpolate(torch.rand(n, 1, 5, 5, device=device), size=(size, size), mode="bicubic",
                              align_corners=True)
        threshold = noise.flatten(1).quantile(0.75, dim=1).view(n, 1, 1, 1)
        return (noise > threshold).float()
    raise ValueError(f"unknown mask kind {kind!r}")


def mask_images(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(1 - M) * x, with the hole filled by the mean colour (paper: the hole is set to the mean)."""
    mean = torch.tensor(common.MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * (1 - m) + mean * m


# ---------------------------------------------------------------------------
# Model: encoder (the backbone), channel-wise fully connected bottleneck, decoder; the discriminator
# ---------------------------------------------------------------------------
class ChannelwiseFC(nn.Module):
    """Each channel's h x w map is mapped by its own fully connected layer, then a 1x1
    convolution mixes the channels (paper sec. 3.1): context spreads across the whole
    map at a fraction of a full fully-connected layer's parameters."""

    def __init__(self, channels: int, positions: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, positions, positions) / math.sqrt(positions))
        self.bias = nn.Parameter(torch.zeros(channels, positions))
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x):  # (N, C, h, w) -> (N, C, h, w)
        n, c, h, w = x.shape
        y = torch.einsum("nci,cij->ncj", x.flatten(2), self.weight) + self.bias
        return self.mix(F.relu(y).view(n, c, h, w))


class ContextEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, width: int, image_size: int, normalize: nn.Module = nn.Identity()):
        super().__init__()
        self.normalize = normalize  # train() passes common.Normalize(): the ImageNet mean and std
        self.backbone = backbone  # the encoder, kept for downstream work
        with torch.no_grad():
            fmap = common.feature_map(backbone.eval(), torch.zeros(1, 3, image_size, image_size))
        backbone.train()
        self.bottleneck = ChannelwiseFC(width, fmap.shape[2] * fmap.shape[3])
        layers, channels, side = [], width, fmap.shape[2]
        while side < image_size:  # transposed convolutions, doubling the side each time
            out = max(16, channels // 2)
            layers += [nn.ConvTranspose2d(channels, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            channels, side = out, side * 2
        layers += [nn.Conv2d(channels, 3, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*layers)

    def forward(self, masked):  # (N, 3, H, W) in [0, 1] -> the whole image reconstructed, (N, 3, H, W)
        out = self.decoder(self.bottleneck(common.feature_map(self.backbone, self.normalize(masked))))
        return F.interpolate(out, size=masked.shape[-2:], mode="bilinear") if out.shape[-1] != masked.shape[-1] else out


class Discriminator(nn.Module):
    """Real, or predicted by the context encoder? It sees what disc_view gives: the hole
    region for the central mask, the whole image for random masks (a small DCGAN-style net)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(32, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.LeakyReLU(0.2, True),
            nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2, True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 1))

    def forward(self, x):  # (N, 3, H, W) in [0, 1] -> logit of "real", (N,)
        return self.net(x * 2 - 1).flatten()


def disc_view(img: torch.Tensor, mask_kind: str, hole: float) -> torch.Tensor:
    """What the adversarial discriminator judges (paper sec. 3.2): for the central hole,
    the hole region alone, so D compares the predicted centre with real centres and
    pushes the fill itself towards sharp, plausible content; for random holes (blocks,
    region), the whole image: for a fake, the raw output of the encoder-decoder."""
    if mask_kind != "center":
        return img
    size = img.shape[-1]
    side = max(1, round(hole * size))
    top = (size - side) // 2  # as make_masks places the central square
    return img[..., top:top + side, top:top + side]


# ---------------------------------------------------------------------------
# Loss: L = lambda_rec L_rec + lambda_adv L_adv (paper eq. 1-3)
# ---------------------------------------------------------------------------
def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor,
                        context_weight: float = 0.0) -> torch.Tensor:
    """L_rec = || W * (x - x_hat) ||^2 / sum(W) with W = M + context_weight (1 - M): with
    context_weight 0 the paper's eq. 1, || M * (x - x_hat) ||^2, per masked value, so the
    loss does not depend on the size of the hole; with 1, the mean squared error over the
    whole output, as the released code trains random holes (the discriminator judges the
    whole output there, so the context it sees is trained towards the image too)."""
    w = (mask + context_weight * (1 - mask)).expand_as(x)
    return (w * (x - x_hat) ** 2).sum() / w.sum().clamp(min=1e-12)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def augment(x, args: Args) -> torch.Tensor:
    """The released code's crop and flip. Photos (whole images kept at --load-size): a random
    --image-size window; images that are --image-size squares already (the built-in
    shapes, CIFAR-10): the whole image. Either flipped at random."""
    if isinstance(x, common.WholeImages):
        return common.random_crop(x, args.image_size, flip=True)
    return common.select(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x, x.flip(-1))


def train(args: Args):
    if args.mask not in ("center", "blocks", "region"):
        common.fail(f"--mask must be center, blocks or region, not {args.mask}")
    if not 0 < args.hole < 1:
        common.fail(f"--hole must be between 0 and 1 (a fraction of the image side), not {args.hole}")
    common.check_image_size(args, 16, "the decoder's upsampling from the backbone's feature map")
    run = common.Run(args, "inpainting")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    backbone, width = common.build_backbone(args.backbone, args.image_size)
    model = run.prepare(ContextEncoder(backbone, width, args.image_size, common.Normalize()))
    disc = run.prepare(Discriminator())
    opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.999), fused=run.fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr * 0.1, betas=(0.5, 0.999), fused=run.fused)

    total_steps = args.epochs * len(loader)
    parts = {"model": model, "discriminator": disc, "opt_g": opt_g, "opt_d": opt_d}
    adversarial = args.adv_weight > 0

    def redraw():  # grid.png after every epoch, to watch the pretext task being learned
        save_grid(common.unwrap(model), data.test, args, run.device, run.out / "grid.png")

    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: encoder_of(net.backbone))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor, epoch_end=redraw):
        lr = common.set_lr(opt_g, common.cosine_lr(step, total_steps, args.lr))
        common.set_lr(opt_d, lr * 0.1)  # the discriminator learns at a tenth of the rate
        x = augment(run.to_device(images), args)  # (N, 3, S, S)
        m = make_masks(len(x), x.shape[-1], args.mask, args.hole, x.device)  # (N, 1, H, W): 1 = dropped
        with run.autocast():
            x_hat = model(run.format(mask_images(x, m))).float()  # F((1 - M) * x)
            loss_rec = reconstruction_loss(x, x_hat, m, 0.0 if args.mask == "center" else args.context_weight)
            fake = disc_view(x_hat, args.mask, args.hole)  # the predicted hole (centre), or the raw output
            # L_adv for the encoder-decoder: make D call its prediction real (the
            # non-saturating form of max_D E[log D(x) + log(1 - D(F((1 - M) x)))]).
            loss_adv = F.binary_cross_entropy_with_logits(disc(fake).float(), torch.ones(len(x), device=x.device)) \
                if adversarial else torch.zeros((), device=x.device)
            loss = args.rec_weight * loss_rec + args.adv_weight * loss_adv
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        loss_d = torch.zeros(())
        if adversarial:  # D: the same view of real images -> 1, of predictions -> 0
            with run.autocast():
                d_real, d_fake = disc(disc_view(x, args.mask, args.hole)).float(), disc(fake.detach()).float()
                loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
                    F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        # [plumbing] progress line, log.jsonl
        run.log(len(images), loss_rec=loss_rec.item(), loss_adv=loss_adv.item(), loss_d=loss_d.item(), lr=lr)

    run.save_encoder(net.backbone)
    if not run.is_main:
        return run.close()
    results = {**test_error(net, data.test, args, run.device), "steps": run.step}
    run.print(f"mean squared error in the hole on the test split: {results['pretext_hole_mse']:.5f}, "
              f"edge strength of the fill / original: {results['pretext_hole_sharpness']:.3f} "
              f"(grid of fills: {run.out / 'grid.png'})")
    return run.finish(results, data, encoder_of(net.backbone),
                      lambda: encoder_of(common.build_backbone(args.backbone, args.image_size)[0]))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, the hole's error and sharpness, the grid
# ---------------------------------------------------------------------------
def encoder_of(backbone: nn.Module) -> nn.Module:
    """What the evaluation protocol sees: whole RGB images in [0, 1] -> backbone features."""
    return nn.Sequential(common.Normalize(), backbone)


@torch.no_grad()
def fill(model, x, m):
    """Context encoder output pasted into the hole; the context is kept as it was."""
    return x * (1 - m) + model(mask_images(x, m)) * m


@torch.no_grad()
def hole_sharpness(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum of |horizontal and vertical differences| inside the hole, in x_hat; the same in x).
    Their ratio measures the lecture's claim that the adversarial loss sharpens the fill:
    a blurry fill has weaker edges than the original (ratio < 1)."""
    def edges(img):
        inside_x = mask[..., :, 1:] * mask[..., :, :-1]  # both neighbours in the hole
        inside_y = mask[..., 1:, :] * mask[..., :-1, :]
        return ((img[..., :, 1:] - img[..., :, :-1]).abs() * inside_x).sum().item() + \
            ((img[..., 1:, :] - img[..., :-1, :]).abs() * inside_y).sum().item()
    return edges(x_hat), edges(x)


@torch.no_grad()
def test_error(model, dataset, args, device, batch_size=512) -> dict:
    """On the test split: the mean squared error in the hole (the pretext metric), and the
    fill's edge strength relative to the original's (pretext_hole_sharpness, 1 = as sharp)."""
    model.eval()
    total = count = fill_edges = true_edges = 0.0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x = common.to_float(images, device)
        m = make_masks(len(x), x.shape[-1], args.mask, args.hole, device)
        x_hat = model(mask_images(x, m))
        total += reconstruction_loss(x, x_hat, m).item() * len(x)
        count += len(x)
        a, b = hole_sharpness(x, x_hat, m)
        fill_edges, true_edges = fill_edges + a, true_edges + b
    model.train()
    return {"pretext_hole_mse": total / count, "pretext_hole_sharpness": fill_edges / max(true_edges, 1e-12)}


def save_grid(model, dataset, args, device, path, n: int = 8):
    """Rows: masked input, the context encoder's fill, the original."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same masks every time, so grids of different runs compare
    n = min(n, len(dataset))  # a test split may be smaller than a row
    x = common.to_float(torch.stack([dataset[i][0] for i in range(n)]), device)
    m = make_masks(n, x.shape[-1], args.mask, args.hole, device)
    torch.random.set_rng_state(gen_state)
    was_training = model.training
    model.eval()
    rows = torch.cat([mask_images(x, m), fill(model, x, m), x])
    model.train(was_training)
    common.save_picture(path, rows, nrow=n)


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
