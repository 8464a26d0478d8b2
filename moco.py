"""MoCo: lecture 13, contrastive learning (section 9).

He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual
Representation Learning", CVPR 2020; MoCo v2: Chen, Fan, Girshick, He, 2020.
Contrastive learning as a dictionary look-up: a query q must match its key k+
among many keys. The keys come from a **queue** of recent batches (many
negatives, not limited by the batch) and a **momentum key encoder** f_k, a
slowly moving copy of the query encoder f_q, so that keys in the queue stay
consistent. The training loop below follows the paper's Algorithm 1 line by line.

    python moco.py                                    # built-in shapes
    python moco.py --mlp --blur --temperature 0.2     # MoCo v2 (cosine schedule is the default)
    python moco.py --schedule step --temperature 0.07 --momentum 0.999 --augmentation v1   # closer to MoCo v1
    python moco.py --negatives memory-bank            # or end-to-end: the paper's other two dictionaries (Fig. 3)
    python moco.py --dataset folder --data-dir data/cifar10-jpg --epochs 10
    # the MoCo CIFAR-10 demo's setting (about 82.6% kNN after 200 epochs, ResNet-18):
    python moco.py --dataset cifar10 --data-dir data --backbone resnet18 --epochs 200 --batch-size 512 --lr 0.06 \\
        --min-crop 0.08 --workers 8

Departures from the paper (docs/moco.md, with their measured effects). The defaults are
those of the official MoCo CIFAR-10 demo, the paper's method scaled to CIFAR-sized data:
K = 4096, m = 0.99, t = 0.1, weight decay 5e-4, cosine schedule, split batch norm over 8
blocks of the batch (one device's stand-in for the paper's shuffled BN across GPUs), the
demo's augmentation (v2's colour jitter; --augmentation v1 for the paper's). Ours beyond that:
- Smallest crop 0.5 of the area (demo: 0.08, paper: 0.2): at 32 px small crops miss the
  object; measured against 0.08 in docs/moco.md (claims.py --claims moco_departures).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    epochs: int = 10  # demo: 200 epochs on CIFAR-10; 10 fit the 3-minute CPU budget on the built-in data
    batch_size: int = 256  # images per process and step; demo: 512, paper: 256
    lr: float = 0.03  # paper: 0.03 for batch 256; demo: 0.06 for batch 512 (the same lr per image)
    weight_decay: float = 5e-4  # demo: 5e-4; paper (ImageNet): 1e-4
    queue_size: int = 4096  # K, negatives in the queue; paper: 65536 for ImageNet, 4096 suits CIFAR-sized data (demo)
    momentum: float = 0.99  # m of the key encoder; paper: 0.999; demo: 0.99, as fewer steps need a faster key encoder
    temperature: float = 0.1  # t; paper v1: 0.07, v2: 0.2, demo: 0.1
    dim: int = 128  # C, the size of q and k (paper: 128)
    bn_splits: int = 8  # batch norm statistics over this many sub-batches (demo: 8); 1 for plain batch norm
    mlp: bool = False  # MoCo v2: a 2-layer MLP head instead of a linear one
    blur: bool = False  # MoCo v2: Gaussian blur augmentation (p = 0.5)
    augmentation: str = "demo"  # demo: the CIFAR demo's, v2's colour jitter (0.4, 0.4, 0.4, 0.1 at p 0.8, then greyscale at p 0.2) | v1: the paper's (greyscale at p 0.2, then jitter 0.4, 0.4, 0.4, 0.4 always)
    schedule: str = "cosine"  # cosine (v2, demo) | step (v1: lr x 0.1 at 60% and 80% of training)
    min_crop: float = 0.5  # smallest crop, fraction of the area; demo: 0.08, paper: 0.2. At 32 px small crops miss the object
    negatives: str = "moco"  # moco (queue + momentum encoder) | end-to-end (the batch) | memory-bank (Wu et al. 2018): paper Fig. 2-3
    bank_momentum: float = 0.5  # memory-bank: stored feature <- m x stored + (1 - m) x new query (Wu et al.'s code: 0.5)
    normalize: str = "imagenet"  # the input's mean and std: imagenet (torchvision's, as every method here) | cifar10 (the demo's; encoder.pt then expects them)


# The input statistics --normalize chooses: ImageNet's, as every method here and the paper
# (on ImageNet), or CIFAR-10's, as the MoCo CIFAR demo's train_transform. Before the first
# convolution and its batch norm the two differ by a per-channel scale and shift of the
# input: the first layer's effective initial scale and step size, and what its zero padding
# stands for. benchmarks/official_curve.py --extra "--normalize cifar10" runs the demo's curve so.
STATS = {"imagenet": (common.MEAN, common.STD),
         "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))}


def normalizer(args: Args) -> nn.Module:
    """The encoder's first layer: (x - mean) / std with --normalize's statistics."""
    return common.Normalize(*STATS[args.normalize])


# ---------------------------------------------------------------------------
# Pretext data: two random augmentations of every image
# ---------------------------------------------------------------------------
def augment(x: torch.Tensor, args: Args) -> torch.Tensor:
    """One random augmentation of each image, batched on the device: a random resized crop
    with flip, then colour, as the MoCo CIFAR demo (its colour jitter is v2's) or as the
    paper's v1 code (--augmentation v1); blur with --blur (v2)."""
    x = common.random_resized_crop(x, scale=(args.min_crop, 1.0), size=args.image_size)  # of the whole image
    if args.augmentation == "v1":
        x = common.random_grayscale(x, p=0.2)
        x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.4, p=1.0)
    else:
        x = common.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8)
        x = common.random_grayscale(x, p=0.2)
    if args.blur:
        x = common.gaussian_blur(x, p=0.5)
    return x


# ---------------------------------------------------------------------------
# Model: query and key encoders, the queue
# ---------------------------------------------------------------------------
class Encoder(nn.Module):
    """x in [0, 1] -> backbone features -> head -> (N, C). The backbone is what is kept."""

    def __init__(self, backbone: nn.Module, width: int, dim: int, mlp: bool, normalize: nn.Module = nn.Identity()):
        super().__init__()
        self.normalize = normalize  # train() passes common.Normalize() with --normalize's mean and std
        self.backbone = backbone
        # v1: a linear head (the fc layer); v2: fc - ReLU - fc (MoCo v2, sec. 2)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim)) if mlp \
            else nn.Linear(width, dim)

    def forward(self, x):
        return self.head(self.backbone(self.normalize(x)))


class MoCo(nn.Module):
    """f_q, f_k, the queue of keys (C x K, one L2-normalised key per column) and its pointer."""

    def __init__(self, f_q: nn.Module, dim: int, K: int, m: float, t: float):
        super().__init__()
        self.f_q = f_q
        self.f_k = copy.deepcopy(f_q)  # f_k.params = f_q.params
        for p in self.f_k.parameters():
            p.requires_grad = False  # no gradient: f_k only moves by the momentum update
        self.K, self.m, self.t = K, m, t
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # C x K, random keys to start
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        """theta_k <- m * theta_k + (1 - m) * theta_q over the parameters only, as the
        official code: f_k's buffers (batch norm statistics) are its own, kept by its own
        forward passes over the keys. self.f_q is the bare encoder; a DDP wrapper for the
        training step lives beside it and shares its parameters."""
        for p_q, p_k in zip(self.f_q.parameters(), self.f_k.parameters()):
            p_k.mul_(self.m).add_(p_q.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def enqueue_dequeue(self, k: torch.Tensor):
        """The newest keys (N x C) replace the oldest N columns, wrapping around."""
        n, ptr = k.shape[0], int(self.queue_ptr)
        assert self.K % n == 0, "K must be a multiple of the global batch"
        self.queue[:, ptr:ptr + n] = k.T
        self.queue_ptr.fill_((ptr + n) % self.K)


# ---------------------------------------------------------------------------
# Loss: InfoNCE over l_pos and l_neg (paper eq. 1)
# ---------------------------------------------------------------------------
def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor):
    """The lecture's l_pos and l_neg. q, k: N x C (normalised), queue: C x K."""
    N, C = q.shape
    l_pos = torch.bmm(q.view(N, 1, C), k.view(N, C, 1)).view(N, 1)  # positive logits: N x 1
    l_neg = torch.mm(q.view(N, C), queue.clone().detach())  # negative logits: N x K
    return l_pos, l_neg


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float):
    """L_q = -log exp(q.k+ / t) / sum_{i=0..K} exp(q.k_i / t) (paper eq. 1): a (1 + K)-way
    softmax classifier that must find the positive key k+ (index 0) among the queue's K
    negatives. q, k: N x C (normalised), queue: C x K. Returns (loss, logits N x (1 + K))."""
    l_pos, l_neg = contrastive_logits(q, k, queue)  # N x 1 (bmm), N x K (mm)
    logits = torch.cat([l_pos, l_neg], dim=1)  # N x (1 + K)
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is index 0
    return F.cross_entropy(logits / t, labels), logits


# ---------------------------------------------------------------------------
# Training: the paper's Algorithm 1
# ---------------------------------------------------------------------------
def train(args: Args):
    if args.schedule not in ("cosine", "step"):
        common.fail(f"--schedule must be cosine or step, not {args.schedule}")
    if args.augmentation not in ("demo", "v1"):
        common.fail(f"--augmentation must be demo or v1, not {args.augmentation}")
    if args.normalize not in STATS:
        common.fail(f"--normalize must be {' or '.join(STATS)}, not {args.normalize}")
    if args.negatives != "moco":
        return train_other_dictionary(args)  # the paper's two baselines, after Algorithm 1 below
    common.check_image_size(args, 16, "the backbone's 16x downsampling")
    run = common.Run(args, "moco")
    global_batch = args.batch_size * run.world
    if args.queue_size % global_batch:
        common.fail(f"--queue-size {args.queue_size} must be a multiple of the global batch {global_batch} "
                    f"(batch size x processes), so each batch of keys replaces a whole block of the queue")
    if args.batch_size % args.bn_splits:
        common.fail(f"--batch-size {args.batch_size} must be a multiple of --bn-splits {args.bn_splits}")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    backbone, width = common.build_backbone(args.backbone, args.image_size)
    encoder = Encoder(use_split_bn(backbone, args.bn_splits), width, args.dim, args.mlp, normalizer(args))
    moco = MoCo(encoder, args.dim, args.queue_size, args.momentum, args.temperature).to(run.device)
    if run.channels_last:
        moco = moco.to(memory_format=torch.channels_last)
    f_q, f_k = run.prepare(moco.f_q), moco.f_k  # f_q: DDP around moco.f_q under torchrun; f_k gets no gradient
    optimizer = torch.optim.SGD(f_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                fused=run.fused)
    chance = math.log(1 + args.queue_size)
    run.print(f"queue K = {args.queue_size}, momentum m = {args.momentum}, temperature t = {args.temperature}; "
              f"chance level of the loss: log(1 + K) = {chance:.3f}")

    total_steps = args.epochs * len(loader)
    # run.steps() starts every process from rank 0's parts: one f_k and one queue for all, as DDP's one f_q
    parts = {"f_q": f_q, "f_k": f_k, "queue": moco.queue, "queue_ptr": moco.queue_ptr, "optimizer": optimizer}
    f_q.train()
    f_k.train()
    monitor = (data, lambda: encoder_of(moco.f_q.backbone, args))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor):
        lr = common.set_lr(optimizer, schedule(step, total_steps, args))
        x = run.to_device(images)  # a minibatch of N images (whole images for image folders)
        x_q, x_k = augment(x, args), augment(x, args)  # two random augmentations
        N = len(x)
        with run.autocast():
            q = F.normalize(f_q(run.format(x_q)).float(), dim=1)  # queries: N x C
            with torch.no_grad():  # keys: N x C, no gradient
                x_k, unshuffle = shuffle_keys(x_k)
                k = F.normalize(f_k(run.format(x_k)).float(), dim=1)
                k = unshuffle_keys(k, unshuffle)
        # l_pos = bmm(q, k), l_neg = mm(q, queue), logits = cat([l_pos, l_neg]), labels = zeros(N),
        loss, logits = infonce(q, k, moco.queue, moco.t)  # loss = CrossEntropyLoss(logits / t, labels)
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # SGD update: query network
        moco.momentum_update()  # f_k.params = m * f_k.params + (1 - m) * f_q.params
        moco.enqueue_dequeue(common.gather(k))  # newest keys (from all processes) in, oldest out
        # instance discrimination: k+ ranked first of 1 + K (argmax(1) == 0, as a comparison: argmax is slow on a CPU)
        acc = (logits[:, 0] >= logits[:, 1:].amax(1)).float().mean()
        run.log(N, loss=loss.item(), chance=chance, acc=acc.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    return finish(run, args, data, f_q, f_k, chance)


def schedule(step: int, total_steps: int, args: Args) -> float:
    """The learning rate: cosine decay (v2, the demo), or v1's x 0.1 at 60% and 80% of training."""
    if args.schedule == "cosine":
        return common.cosine_lr(step, total_steps, args.lr)
    return args.lr * 0.1 ** sum(step >= f * total_steps for f in (0.6, 0.8))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, and the key accuracy
# ---------------------------------------------------------------------------
def finish(run, args: Args, data, f_q, f_k, chance: float):
    """The end of training: save f_q's backbone; the key accuracy, the common protocol
    beside the random-init backbone, eval.json."""
    backbone = common.unwrap(f_q).backbone
    run.save_encoder(backbone)
    if not run.is_main:
        return run.close()
    results = {"pretext_top1": key_accuracy(common.unwrap(f_q), f_k, data.test, args, run.device),
               "steps": run.step, "loss_chance": chance}
    run.print(f"query finds its key among 512 test keys: {results['pretext_top1']:.4f} (chance {1 / 512:.4f})")
    return run.finish(results, data, encoder_of(backbone, args),
                      lambda: encoder_of(common.build_backbone(args.backbone, args.image_size)[0], args))


def encoder_of(backbone: nn.Module, args: Args) -> nn.Module:
    """What the evaluation protocol sees: RGB in [0, 1] -> backbone features (the query encoder's)."""
    return nn.Sequential(normalizer(args), backbone)


@torch.no_grad()
def key_accuracy(f_q, f_k, dataset, args, device, batch_size=512) -> float:
    """Held-out instance discrimination: how often q ranks its own key first among the
    keys of a test batch of 512 images. Unlike the training accuracy it does not
    depend on the queue, whose random start makes early steps look easy."""
    f_q.eval(), f_k.eval()
    correct = total = 0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=len(dataset) > batch_size):
        x = common.to_float(images, device)
        q = F.normalize(f_q(augment(x, args)), dim=1)
        k = F.normalize(f_k(augment(x, args)), dim=1)
        correct += ((q @ k.T).argmax(1) == torch.arange(len(x), device=device)).sum().item()
        total += len(x)
    f_q.train(), f_k.train()
    return correct / total


# ---------------------------------------------------------------------------
# Beyond the lecture: shuffling BN across devices (paper sec. 3.3), split BN on one
# ---------------------------------------------------------------------------
@torch.no_grad()
def shuffle_keys(x: torch.Tensor):
    """Shuffle the key batch so a key's batch-norm statistics come from other images than
    its query's. Under torchrun across all processes, as in the paper; on one device
    within the batch, so each split-BN sub-batch mixes other images (the demo's way).
    Returns the shuffled local batch and the index that undoes the shuffle."""
    x_all = common.gather(x)  # global batch, rank order
    perm = torch.randperm(len(x_all), device=x.device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(perm, src=0)  # every process uses rank 0's permutation
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    unshuffle = torch.argsort(perm)
    return x_all[perm.view(world, -1)[rank]], unshuffle


@torch.no_grad()
def unshuffle_keys(k: torch.Tensor, unshuffle: torch.Tensor):
    k_all = common.gather(k)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    return k_all[unshuffle.view(world, -1)[rank]]


class SplitBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics come from `num_splits` sub-batches, the
    single-device stand-in for the paper's per-GPU batch norm (sec. 3.3, "Shuffling BN"),
    as in the MoCo CIFAR demo. Sub-batch j is the j-th block of the batch, as device j
    would hold it. The demo takes images j, j + s, j + 2s, ... instead, with one reshape
    to (N / s, s * C, H, W); that reshape copies channels_last tensors, where blocks are
    views in any layout (a copy per layer saved; not measured in a table here). At
    evaluation it is plain batch norm, and its state_dict is a BatchNorm2d's."""

    def __init__(self, num_features, num_splits):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        outs, means, variances = [], [], []
        for block in x.chunk(self.num_splits):  # batch norm as on its own device: statistics of the block
            mean, var = self.running_mean.clone(), self.running_var.clone()  # updated in place by batch_norm
            outs.append(F.batch_norm(block, mean, var, self.weight, self.bias, True, self.momentum, self.eps))
            means.append(mean)
            variances.append(var)
        self.running_mean.copy_(torch.stack(means).mean(0))  # the devices' running statistics, averaged
        self.running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outs)


def use_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm (same parameters)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and num_splits > 1:
            split = SplitBatchNorm(child.num_features, num_splits)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            use_split_bn(child, num_splits)
    return module


# ---------------------------------------------------------------------------
# Beyond the lecture: the two dictionaries MoCo is compared with (paper sec. 3.2, Fig. 2 and 3)
# ---------------------------------------------------------------------------
class Indexed(torch.utils.data.Dataset):
    """(image, its index): the memory bank keeps one feature per training image."""

    def __init__(self, dataset):
        self.dataset, self.whole_images = dataset, getattr(dataset, "whole_images", False)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], i


def train_other_dictionary(args: Args):
    """--negatives end-to-end: the keys are the other images of the current batch, encoded
    by the query encoder itself, with gradient (Fig. 2a): K = global batch - 1, bounded by
    memory; through shuffled batch norm as Algorithm 1's keys, which the paper uses "in
    both our method and its end-to-end ablation counterpart" (sec. 3.3). --negatives memory-bank: one stored feature per training image (Wu et al.
    2018), refreshed from the query when its image comes round (stored <- m stored + (1 - m)
    q, normalised); the positive is the image's own stored feature, and K negatives are
    drawn from the bank at random (Fig. 2b): large K, but keys from encoders of up to an
    epoch ago. Same encoder, augmentation, loss and schedule as Algorithm 1."""
    if args.negatives not in ("end-to-end", "memory-bank"):
        common.fail(f"--negatives must be moco, end-to-end or memory-bank, not {args.negatives}")
    if args.batch_size % args.bn_splits:
        common.fail(f"--batch-size {args.batch_size} must be a multiple of --bn-splits {args.bn_splits}")
    run = common.Run(args, "moco")
    data = common.load_image_data(args)
    loader = run.loader(Indexed(data.pretrain))
    backbone, width = common.build_backbone(args.backbone, args.image_size)
    f_q = run.prepare(Encoder(use_split_bn(backbone, args.bn_splits), width, args.dim, args.mlp, normalizer(args)))
    optimizer = torch.optim.SGD(f_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                fused=run.fused)
    bank = F.normalize(torch.randn(len(data.pretrain), args.dim, device=run.device), dim=1)  # memory-bank only
    K = args.batch_size * run.world - 1 if args.negatives == "end-to-end" else args.queue_size
    chance = math.log(1 + K)
    run.print(f"negatives: {args.negatives}, K = {K}; chance level of the loss: log(1 + K) = {chance:.3f}")

    total_steps = args.epochs * len(loader)
    parts = {"f_q": f_q, "bank": bank, "optimizer": optimizer}  # rank 0's bank on every process (run.steps())
    f_q.train()
    monitor = (data, lambda: encoder_of(common.unwrap(f_q).backbone, args))
    for step, (images, idx) in run.steps(loader, parts, monitor=monitor):
        lr = common.set_lr(optimizer, schedule(step, total_steps, args))
        x = run.to_device(images)
        N = len(x)
        with run.autocast():
            q = F.normalize(f_q(run.format(augment(x, args))).float(), dim=1)  # queries: N x C
            if args.negatives == "end-to-end":  # keys by the same encoder, with gradient, through shuffled BN
                x_k, unshuffle = shuffle_keys(augment(x, args))
                k = F.normalize(f_q(run.format(x_k)).float(), dim=1)
        if args.negatives == "end-to-end":
            k = common.gather_with_grad(k)[unshuffle]  # the global batch's keys, unshuffled: N_all x C
            logits = q @ k.T  # N x N_all: the positive is each query's own image
            labels = torch.arange(N, device=q.device) + N * (run.rank if run.distributed else 0)
        else:
            idx = idx.to(q.device)
            l_pos = (q * bank[idx]).sum(1, keepdim=True)  # N x 1: its own stored feature
            l_neg = q @ bank[torch.randint(len(bank), (K,), device=q.device)].T  # N x K: random stored features
            logits = torch.cat([l_pos, l_neg], dim=1)
            labels = torch.zeros(N, dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits / args.temperature, labels)
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if args.negatives == "memory-bank":  # refresh this batch's entries (all processes' batches)
            with torch.no_grad():
                idx_all, q_all = common.gather(idx), common.gather(q.detach())
                bank[idx_all] = F.normalize(args.bank_momentum * bank[idx_all] + (1 - args.bank_momentum) * q_all,
                                            dim=1)
        acc = (logits.argmax(1) == labels).float().mean()
        run.log(N, loss=loss.item(), chance=chance, acc=acc.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    return finish(run, args, data, f_q, common.unwrap(f_q), chance)  # keys by f_q: no f_k here


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
