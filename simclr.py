"""SimCLR: lecture 13, contrastive learning (section 8).

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning
of Visual Representations", ICML 2020. The lecture's four steps:
  1. augment each of N images twice: 2N views;
  2. an encoder f (a ResNet) gives h = f(x);
  3. a small MLP projection head g gives z = g(h), where the loss is applied;
  4. NT-Xent: each view must pick out its partner among the other 2N - 1 views
     by cosine similarity / temperature. Downstream uses h, not z.

    python simclr.py                                  # built-in shapes
    python simclr.py --augment crop                   # ablation: crop alone (also color, crop,color, all)
    python simclr.py --no-proj-bn                     # g as the paper's text: a plain MLP
    python simclr.py --dataset folder --data-dir data/cifar10-jpg --epochs 10
    # CIFAR-10 on 4 GPUs, paper settings (negatives are gathered from all 4 processes):
    torchrun --nproc_per_node=4 simclr.py --dataset cifar10 --backbone resnet18 --batch-size 128 \\
        --epochs 200 --lr 0.5 --temperature 0.5 --min-crop 0.08 --workers 8

Departures from the paper (docs/simclr.md, with their measured effects), for short runs at 32 px:
- Smallest crop 0.5 of the area (paper: 0.08) and temperature 0.2 (paper, CIFAR-10: 0.5):
  at 32 px an 8% crop often misses the object. Both are measured against the paper's
  values in docs/simclr.md (`benchmarks/claims.py --claims simclr_departures`).
- SGD with momentum and weight decay 5e-4, one warm-up epoch (paper: LARS, 1e-6, 10
  warm-up epochs; --optimizer lars).
- The loss is the mean over the 2N views, half the released code's (nt_xent): at one
  learning rate our step is half as large.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    epochs: int = 10  # paper: 100 to 800 epochs (1000 for CIFAR-10); 10 fit the 3-minute CPU budget
    batch_size: int = 256  # paper: 256 to 8192 (4096 main); more negatives help, see --lr
    lr: float = 0.3  # SGD peak lr for batch 256; paper (LARS): 0.3 x batch / 256. Our loss is half the released code's (nt_xent), so its step is twice ours at one lr
    weight_decay: float = 5e-4  # paper: 1e-6 with LARS; 5e-4 suits SGD on CIFAR-sized data
    optimizer: str = "sgd"  # sgd (momentum 0.9) | lars (paper, for large batches)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay (paper: 10 warm-up epochs)
    temperature: float = 0.2  # tau; paper B.9: 0.5 for CIFAR-10 over 1000 epochs; with --min-crop 0.5, 0.2 learns in short runs where the paper's pair does not (docs/simclr.md)
    proj_dim: int = 128  # size of z (paper: 128)
    proj_bn: bool = True  # g as the paper's released code: batch norm after both layers, the output's without centring; --no-proj-bn: the plain MLP of the paper's text (sec. 2.1)
    augment: str = "all"  # comma list of crop, color, blur, or all (crop,color, + blur at >= 96 px); paper Fig. 5
    color_strength: float = 0.5  # colour distortion strength s; paper: 0.5 for CIFAR-10, 1.0 for ImageNet
    min_crop: float = 0.5  # smallest crop, fraction of the area; paper: 0.08. At 32 px small crops miss the object (docs/simclr.md)
    sync_bn: bool = True  # under torchrun on GPUs: batch norm statistics over all processes (paper sec. 2.2, global BN)


# ---------------------------------------------------------------------------
# Pretext data: two random views of every image
# ---------------------------------------------------------------------------
AUGMENTATIONS = ("crop", "color", "blur")


def parse_augment(spec: str, image_size: int) -> set[str]:
    if spec == "all":  # paper: blur helps on ImageNet-sized images, not on 32 px CIFAR (appendix B.9)
        return {"crop", "color"} | ({"blur"} if image_size >= 96 else set())
    chosen = {a.strip() for a in spec.split(",") if a.strip() and a.strip() != "none"}
    unknown = chosen - set(AUGMENTATIONS)
    if unknown:
        common.fail(f"--augment: unknown {sorted(unknown)} (choose from {', '.join(AUGMENTATIONS)}, all, none)")
    return chosen


def augment(x: torch.Tensor, chosen: set[str], args: Args) -> torch.Tensor:
    """One random view of each image (paper appendix A), batched on the device."""
    if "crop" in chosen:  # random resized crop + horizontal flip (of the whole image, for image folders)
        x = common.random_resized_crop(x, scale=(args.min_crop, 1.0), size=args.image_size)
    elif isinstance(x, common.WholeImages):  # no crop: the same centred square every time
        x = common.centre_squares(x, args.image_size)
    if "color" in chosen:  # colour distortion: jitter (p = 0.8), then greyscale (p = 0.2)
        s = args.color_strength
        x = common.color_jitter(x, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8)
        x = common.random_grayscale(x, p=0.2)
    if "blur" in chosen:  # p = 0.5, sigma in [0.1, 2.0], kernel 10% of the side
        x = common.gaussian_blur(x, p=0.5)
    return x


# ---------------------------------------------------------------------------
# Model: encoder f and projection head g
# ---------------------------------------------------------------------------
class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, width: int, proj_dim: int, proj_bn: bool = True,
                 normalize: nn.Module = nn.Identity()):
        super().__init__()
        self.normalize = normalize  # train() passes common.Normalize(): the ImageNet mean and std
        self.f = backbone  # h = f(x): the representation kept for downstream tasks
        # g: an MLP with one hidden layer, z = W2 relu(W1 h) (paper sec. 2.1). The released
        # code (model_util.projection_head) puts batch norm after W1 and after W2, the
        # second without centring (a scale, no shift), and drops the biases it makes moot.
        if proj_bn:
            out_bn = nn.BatchNorm1d(proj_dim)
            out_bn.bias.requires_grad_(False)  # held at 0: no centring (the released code's center=False)
            self.g = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                   nn.Linear(width, proj_dim, bias=False), out_bn)
        else:
            self.g = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim))

    def forward(self, x):  # x: (B, 3, H, W) in [0, 1] -> z: (B, proj_dim)
        return self.g(self.f(self.normalize(x)))


# ---------------------------------------------------------------------------
# Loss: NT-Xent on the interleaved 2N x 2N similarity matrix
# ---------------------------------------------------------------------------
def similarity_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float):
    """The lecture's 2N x 2N matrix of s_ij / tau, self-similarities masked, and the targets.

    z1[i], z2[i]: the two views of image i, (N, d), not yet normalised. The views are
    interleaved, rows 2k and 2k+1 being a positive pair, so each positive sits
    beside the diagonal: row 2k's target is 2k+1 and row 2k+1's is 2k."""
    n = len(z1)
    z = torch.stack([z1, z2], dim=1).reshape(2 * n, -1)  # 2N x d: z1[0], z2[0], z1[1], z2[1], ...
    z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature  # 2N x 2N: s_ij / tau, s = cosine similarity
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # k != i in the denominator
    targets = torch.arange(2 * n, device=z.device) ^ 1  # 0<->1, 2<->3, ...: the partner view
    return logits, targets


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau), averaged over all 2N rows
    (both orders of all N positive pairs; paper Algorithm 1: L = 1/2N sum_k [l(2k-1, 2k) +
    l(2k, 2k-1)]). The released code returns loss_a + loss_b, each the mean over N rows:
    twice this, so at one learning rate its step is twice as large as ours."""
    logits, targets = similarity_logits(z1, z2, temperature)
    return F.cross_entropy(logits, targets)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def train(args: Args):
    chosen = parse_augment(args.augment, args.image_size)
    if args.optimizer not in ("sgd", "lars"):
        common.fail(f"--optimizer must be sgd or lars, not {args.optimizer}")
    common.check_image_size(args, 16, "the backbone's 16x downsampling")
    run = common.Run(args, "simclr")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    backbone, width = common.build_backbone(args.backbone, args.image_size)
    model = run.prepare(global_batch_norm(SimCLR(backbone, width, args.proj_dim, args.proj_bn, common.Normalize()),
                                          run, args.sync_bn))
    if args.optimizer == "lars":
        optimizer = LARS(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                    fused=run.fused)
    run.print(f"augmentations: {', '.join(sorted(chosen)) or 'none'}; "
              f"negatives per view: {2 * args.batch_size * run.world - 2}")

    total_steps = args.epochs * len(loader)
    warmup = int(args.warmup_epochs * len(loader))
    parts = {"model": model, "optimizer": optimizer}
    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: encoder_of(net.f))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr, warmup))
        x = run.to_device(images)  # image folders: each view is cropped from the whole image
        x1, x2 = augment(x, chosen, args), augment(x, chosen, args)  # two views of each image: (N, 3, H, W)
        with run.autocast():
            # One forward pass for both views, so batch norm sees all 2N views together.
            z1, z2 = model(run.format(torch.cat([x1, x2]))).float().chunk(2)  # N x d each
        # Under torchrun the negatives are the global batch: gather z from every process.
        z1, z2 = common.gather_with_grad(z1), common.gather_with_grad(z2)
        loss = nt_xent(z1, z2, args.temperature)  # l(i, j) over all 2N views
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logits, targets = similarity_logits(z1, z2, args.temperature)
            acc = (logits.argmax(1) == targets).float().mean()  # partner ranked first among 2N - 1
        run.log(len(images), loss=loss.item(), acc=acc.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    run.save_encoder(net.f)
    if not run.is_main:
        return run.close()
    results = {"pretext_top1": _pair_accuracy(net, data.test, chosen, args, run.device), "steps": run.step}
    run.print(f"positive-pair top-1 on the test split (batch {min(len(data.test), 512)}): {results['pretext_top1']:.4f}")
    return run.finish(results, data, encoder_of(net.f),
                      lambda: encoder_of(common.build_backbone(args.backbone, args.image_size)[0]))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, and the pair accuracy
# ---------------------------------------------------------------------------
def encoder_of(backbone: nn.Module) -> nn.Module:
    """What the evaluation protocol sees: RGB in [0, 1] -> h."""
    return nn.Sequential(common.Normalize(), backbone)


@torch.no_grad()
def _pair_accuracy(model, dataset, chosen, args, device, batch_size=512):
    """How often a view finds its partner among 2 x 512 - 1 test views (the pretext accuracy)."""
    model.eval()
    correct = total = 0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=len(dataset) > batch_size):
        x = common.to_float(images, device)
        z1, z2 = model(augment(x, chosen, args)), model(augment(x, chosen, args))
        logits, targets = similarity_logits(z1, z2, args.temperature)
        correct += (logits.argmax(1) == targets).sum().item()
        total += len(targets)
    model.train()
    return correct / total


# ---------------------------------------------------------------------------
# Beyond the lecture: large batches on many devices (paper sec. 2.2): global batch norm, LARS
# ---------------------------------------------------------------------------
def global_batch_norm(model: nn.Module, run, wanted: bool) -> nn.Module:
    """Under torchrun, batch norm over the global batch (SyncBatchNorm). With each
    process normalising its own share, positives share their local statistics and a
    network can tell them apart from negatives by those (paper sec. 2.2, "Global BN").
    PyTorch's SyncBatchNorm runs on GPUs only: processes on CPUs keep their own."""
    if not (wanted and run.distributed):
        return model
    if not run.cuda:
        run.print("batch norm per process: SyncBatchNorm needs GPUs (--sync-bn applies under torchrun on CUDA)")
        return model
    run.print("batch norm over the global batch of all processes (SyncBatchNorm; --no-sync-bn turns it off)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is scaled by the trust ratio
    eta * |w| / |g + wd * w|. Biases and BatchNorm parameters (1-d) get neither weight
    decay nor the scaling, as in the paper's implementation."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
