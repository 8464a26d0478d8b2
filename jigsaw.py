"""Solve jigsaw puzzles: lecture 13, pretext task 3.

Noroozi, Favaro, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", ECCV 2016. Cut the image into a 3x3 grid of cells, take a
slightly smaller tile at a random place in each cell (a gap between tiles, so
edges cannot be matched), shuffle the 9 tiles by a permutation from a fixed
set, and predict which permutation it was. The set is chosen greedily, each
new permutation the farthest on average (Hamming distance) from those chosen
(Algorithm 1), so puzzles are far apart. A "context-free network" embeds each
tile on its own with one shared backbone; the 9 features are concatenated in
tile order and classified. Shortcuts closed as the paper: the gap, each tile
normalised on its own, and against chromatic aberration each colour channel of
a tile moved by up to 2 px, and 30% of the images in greyscale.

    python jigsaw.py                                  # built-in shapes at 64 px, 100 permutations
    python jigsaw.py --num-perms 1000                 # the paper's main setting
    python jigsaw.py --perm-rule minimum              # ours: the largest minimum distance first
    python jigsaw.py --dataset folder --data-dir data/cifar10-jpg --epochs 1   # CIFAR-10 upsampled to 64 px

Departures from the paper (docs/jigsaw.md, with their measured effects):
- Tiles of 14 px in 21 px cells at 64 px, where the paper's proportion (64 px in 75 px
  cells) would be 18 px: gaps of 0-6 px, narrow enough to match edges across; measured
  against the default in docs/jigsaw.md (`benchmarks/claims.py --claims jigsaw_departures`).
- Head: one hidden layer of 512 on the 9 concatenated features, where the paper has fc6
  per tile (1024), fc7 (4096) and fc8. Not measured against the paper's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Args(common.Args):
    image_size: int = 64  # cells are image_size // 3 px; tiles must fit in them (paper: 225 px crops, 75 px cells)
    epochs: int = 3  # sized for the 3-minute CPU budget on the built-in data (the task is learned by then)
    batch_size: int = 128  # puzzles per step (paper: 256)
    lr: float = 0.05  # SGD peak lr; warm-up, then cosine decay
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    num_perms: int = 100  # size of the permutation set (paper: 1000 in the main result, 100 also studied)
    # 14 px tiles in 21 px cells leave 0-14 px (7 on average) between neighbours. The paper's
    # proportion (64 px tiles in 75 px cells) would be 18 px here: 0-6 px, narrow enough for the
    # network to match edges across; --tile 18 is measured against 14 in docs/jigsaw.md.
    tile: int = 14  # tile side in px, taken at a random place inside its cell (paper: 64 px in 75 px cells; why 14: docs)
    perm_seed: int = 0  # seed of the permutation set (fixed, so a saved model keeps its meaning)
    perm_rule: str = "average"  # average: the paper's Algorithm 1, each new permutation the farthest on average from those chosen | minimum: the farthest at its nearest first (ours, not the paper's)
    channel_jitter: int = 2  # each colour channel of a tile moved by up to this many px in x and y (paper sec. 3.3: 0-2 px)
    grey: float = 0.3  # fraction of the images turned to greyscale (paper sec. 3.3: about 30%)


# ---------------------------------------------------------------------------
# Pretext data: the permutation set, and puzzles made with it
# ---------------------------------------------------------------------------
def make_permutations(num_perms: int, seed: int = 0, rule: str = "average") -> torch.Tensor:
    """(P, 9) LongTensor of distinct permutations of 0..8, chosen greedily for large
    Hamming distance (paper sec. 3.2, Algorithm 1).

    Start from a random permutation; then repeatedly add the permutation, among the rest
    of all 9! = 362,880, whose average Hamming distance to the chosen ones is largest
    (rule "average", the paper's Algorithm 1), ties broken at random (seeded). Rule
    "minimum" (ours, not the paper's) puts the smallest distance to the chosen ones
    first and the average second, which keeps near-duplicate puzzles out of small sets."""
    if not 1 <= num_perms <= 362_880:
        raise ValueError(f"num_perms must be between 1 and 9! = 362880, not {num_perms}")
    if rule not in ("average", "minimum"):
        raise ValueError(f"rule must be average or minimum, not {rule!r}")
    all_perms = torch.tensor(list(itertools.permutations(range(9))), dtype=torch.uint8)  # 9! x 9
    columns = all_perms.T.contiguous()  # 9 x 9!: one row per tile position, for fast comparisons
    gen = torch.Generator().manual_seed(seed)
    tie_break = torch.randint(0, 1 << 10, (len(all_perms),), generator=gen, dtype=torch.int64)

    def distance_to(p):  # Hamming distance of every permutation to p: 9! values in 0..9
        p = p.tolist()
        d = (columns[0] != p[0]).to(torch.uint8)
        for i in range(1, 9):
            d.add_(columns[i] != p[i])
        return d.long()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small element-wise ops run faster on one thread
    first = int(torch.randint(len(all_perms), (1,), generator=gen))
    chosen = [first]
    total = distance_to(all_perms[first])  # sum of the distances to the chosen ones: their average x their number
    min_dist = total.clone()
    for _ in range(num_perms - 1):
        key = selection_key(total, tie_break, min_dist if rule == "minimum" else None)
        key[chosen] = -1  # a chosen permutation leaves the pool (Algorithm 1, line 7)
        best = int(key.argmax())
        chosen.append(best)
        d = distance_to(all_perms[best])
        total += d
        min_dist = torch.minimum(min_dist, d)
    torch.set_num_threads(threads)
    return all_perms[chosen].long()


def selection_key(total: torch.Tensor, tie_break: torch.Tensor, min_dist: torch.Tensor | None = None) -> torch.Tensor:
    """One int64 per candidate whose argmax is the next choice: the largest total (= average)
    distance, then the tie-break (< 2^10); with min_dist, the largest minimum distance before
    both. total < 9 x 9! < 2^22, so (total << 10) stays below 2^32, and min_dist (<= 9) sits
    above it."""
    key = (total.long() << 10) | tie_break
    return key if min_dist is None else (min_dist.long() << 32) | key


def make_puzzle(images: torch.Tensor, perms: torch.Tensor, tile: int, margin: int = 0):
    """Tiles (N, 9, C, t + 2 margin, t + 2 margin) shuffled by a random permutation from
    `perms`, and its index (N,).

    Cells are (side // 3) px; each tile sits at a random place inside its cell and comes
    with `margin` px of its surroundings on every side (the image's edge repeated beyond
    it), for chromatic_jitter to move its channels in. Tile position i holds cell
    perms[label][i], so the network sees the cells in that order; tiles[:, argsort(perm)]
    puts them back."""
    n, c, h, w = images.shape
    cell = min(h, w) // 3
    if tile > cell:
        raise ValueError(f"tiles of {tile} px do not fit in the {cell} px cells of a {h}x{w} image")
    dev = images.device
    offsets = torch.randint(0, cell - tile + 1, (n, 9, 2), device=dev)  # where in its cell each tile sits
    grid = torch.tensor([(r, col) for r in range(3) for col in range(3)], device=dev)  # cell k: (row, column)
    corners = grid.unsqueeze(0) * cell + offsets  # (N, 9, 2), cells in reading order
    labels = torch.randint(0, len(perms), (n,), device=dev)
    order = perms.to(dev)[labels]  # (N, 9): tile position i shows cell order[i]
    corners = corners.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))  # the cells in the order shown
    r = torch.arange(-margin, tile + margin, device=dev)  # the tile and its margin; beyond the image's
    rows = (corners[..., :1] + r).clamp(0, h - 1)  # edge, its last row or column repeated (N, 9, t + 2m)
    cols = (corners[..., 1:] + r).clamp(0, w - 1)
    # Tile position i, channel ch, pixel (y, x) of image b: one gather by flat index (take),
    # several times faster on a CPU than indexing with four index tensors.
    plane = (torch.arange(n, device=dev).view(n, 1, 1) * c + torch.arange(c, device=dev).view(1, 1, c)) * (h * w)
    index = plane.unsqueeze(-1).unsqueeze(-1) + (rows * w).view(n, 9, 1, -1, 1) + cols.view(n, 9, 1, 1, -1)
    return images.reshape(-1).take(index), labels  # (N, 9, C, t + 2m, t + 2m)


def chromatic_jitter(tiles: torch.Tensor, margin: int, grey: torch.Tensor) -> torch.Tensor:
    """Tiles with a margin (N, 9, 3, t + 2m, t + 2m) -> (N, 9, 3, t, t): each colour channel
    of each tile cut at its own offset of -m to m px in x and y, so that the colour
    fringes of a lens's chromatic aberration do not line up across tiles (paper sec. 3.3:
    0 to 2 px). The images marked `grey` (N,) become greyscale instead, every channel at
    the tile's own place (paper: about 30% of the images)."""
    n, k, c, side, _ = tiles.shape
    t = side - 2 * margin
    dev = tiles.device
    shift = torch.randint(0, 2 * margin + 1, (n, k, c, 2), device=dev)  # m: the tile's own place
    shift[grey] = margin
    r = torch.arange(t, device=dev)
    rows = (shift[..., :1] + r).unsqueeze(-1)  # (N, 9, C, t, 1)
    cols = (shift[..., 1:] + r).unsqueeze(-2)  # (N, 9, C, 1, t)
    plane = torch.arange(n * k * c, device=dev).view(n, k, c, 1, 1) * (side * side)  # where each channel of a tile starts
    out = tiles.reshape(-1).take(plane + rows * side + cols)  # by flat index, as make_puzzle
    # torch.where(grey, channel mean, out), as a lerp by 0 or 1 (the same values; torch.where is slow on a CPU)
    return torch.lerp(out, out.mean(2, keepdim=True).expand_as(out), grey.view(n, 1, 1, 1, 1).to(out.dtype))


def normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile to zero mean and unit std per channel on its own (paper sec. 3.3), so
    brightness and contrast cannot tie neighbouring tiles together."""
    centred = tiles - tiles.mean((-2, -1), keepdim=True)
    pixels = tiles.shape[-2] * tiles.shape[-1]
    std = centred.square().sum((-2, -1), keepdim=True).div_(pixels - 1).sqrt_()  # torch.std's (unbiased), written
    return centred.div_(std.add_(1e-2))  # out: torch.std_mean (Welford's) is 5x slower on a CPU


# ---------------------------------------------------------------------------
# Model: the context-free network
# ---------------------------------------------------------------------------
class ContextFreeNet(nn.Module):
    """One backbone for all 9 tiles (shared weights: each tile is embedded without seeing
    the others), features concatenated in tile order, then a classifier over the set."""

    def __init__(self, backbone: nn.Module, width: int, num_perms: int):
        super().__init__()
        self.backbone = backbone
        # paper: fc6 per tile (1024), concatenated, fc7 (4096), fc8 (num_perms)
        self.head = nn.Sequential(nn.Linear(9 * width, 512), nn.ReLU(inplace=True), nn.Linear(512, num_perms))

    def forward(self, tiles):  # (N, 9, 3, t, t), normalised per tile -> logits (N, P)
        n = len(tiles)
        feats = self.backbone(tiles.flatten(0, 1))  # 9N x width
        return self.head(feats.view(n, -1))  # concatenated in tile order: N x 9 width


# ---------------------------------------------------------------------------
# Loss: the cross-entropy over the permutation set
# ---------------------------------------------------------------------------
def permutation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cross-entropy over the permutation set: which permutation shuffled the 9 tiles
    (paper sec. 3, the permutation index as the class)."""
    return F.cross_entropy(logits, y)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def crop_window(x, args: Args) -> torch.Tensor:
    """The window a puzzle is cut from. Photos (whole images kept at --load-size, by default
    --image-size / 0.875): a random --image-size square of each, as the paper's random
    225 x 225 window of a 256 px image (sec. 3.3). Images that are --image-size squares
    already (the built-in shapes, CIFAR-10): the whole image."""
    return common.random_crop(x, args.image_size) if isinstance(x, common.WholeImages) else x


def train(args: Args):
    if args.tile < 8:
        common.fail(f"--tile must be at least 8 px, not {args.tile}")
    if args.perm_rule not in ("average", "minimum"):
        common.fail(f"--perm-rule must be average or minimum, not {args.perm_rule}")
    if args.grey > 1:
        common.fail(f"--grey is a fraction of the images, at most 1, not {args.grey}")
    common.check_image_size(args, 3 * args.tile, f"3x3 cells that hold {args.tile} px tiles (3 x tile)")
    run = common.Run(args, "jigsaw")
    perms = make_permutations(args.num_perms, args.perm_seed, args.perm_rule)
    min_d = int((perms.unsqueeze(0) != perms.unsqueeze(1)).sum(-1).fill_diagonal_(9).min()) if len(perms) > 1 else 9
    run.print(f"{len(perms)} permutations, minimum pairwise Hamming distance {min_d}")
    data = common.load_image_data(args)
    loader = run.loader(data.pretrain)
    backbone, width = common.build_backbone(args.backbone, args.tile)
    model = run.prepare(ContextFreeNet(backbone, width, args.num_perms))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay, fused=run.fused)

    total_steps = args.epochs * len(loader)
    warmup = int(args.warmup_epochs * len(loader))
    parts = {"model": model, "optimizer": optimizer, "perms": perms}
    model.train()
    net = common.unwrap(model)
    monitor = (data, lambda: TileNormalizedEncoder(net.backbone))  # the kNN learning curve, --monitor-every
    for step, (images, _) in run.steps(loader, parts, monitor=monitor):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr, warmup))
        x = crop_window(run.to_device(images), args)  # (N, 3, S, S)
        tiles, y = make_puzzle(x, perms, args.tile, args.channel_jitter)  # (N, 9, 3, t+2j, t+2j)
        grey = torch.rand(len(tiles), device=tiles.device) < args.grey  # chromatic aberration: some images grey,
        tiles = normalize_tiles(chromatic_jitter(tiles, args.channel_jitter, grey))  # the rest's channels moved
        with run.autocast():
            logits = model(tiles)  # (N, P)
            loss = permutation_loss(logits.float(), y)
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        acc = (logits.argmax(1) == y).float().mean()
        run.log(len(images), loss=loss.item(), acc=acc.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    run.save_encoder(net.backbone)
    if not run.is_main:
        return run.close()
    results = {"pretext_top1": pretext_accuracy(net, data.test, perms, args, run.device), "steps": run.step,
               "min_hamming": min_d}
    run.print(f"permutation accuracy on the test split: {results['pretext_top1']:.4f} (chance {1 / len(perms):.4f})")
    return run.finish(results, data, TileNormalizedEncoder(net.backbone),
                      lambda: TileNormalizedEncoder(common.build_backbone(args.backbone, args.tile)[0]))


# ---------------------------------------------------------------------------
# Evaluation: what the protocol sees, and the permutation accuracy
# ---------------------------------------------------------------------------
class TileNormalizedEncoder(nn.Module):
    """What the evaluation protocol sees: whole RGB images in [0, 1], normalised per image
    as the tiles were during training, -> backbone features."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(normalize_tiles(x.unsqueeze(1)).squeeze(1))


@torch.no_grad()
def pretext_accuracy(model, dataset, perms, args, device, batch_size=256) -> float:
    """Permutation accuracy on held-out images (per-tile normalisation, no greyscale, no channel jitter)."""
    model.eval()
    correct = total = 0
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        tiles, labels = make_puzzle(common.to_float(images, device), perms, args.tile)
        correct += (model(normalize_tiles(tiles)).argmax(1) == labels).sum().item()
        total += len(labels)
    model.train()
    return correct / total


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
