"""Colourise videos by copying colours, and tracking emerges: lecture 13, pretext task 7.

Vondrick, Shrivastava, Fathi, Guadarrama, Murphy, "Tracking Emerges by
Colorizing Videos", ECCV 2018. Reference frames keep their colour; the target
frame is given in greyscale. An embedding network f gives a vector per
location of every (greyscale) frame, and the target's colours are *copied*
from the references through the pointer

    A_ij = exp(f_i . f_j / T) / sum_k exp(f_k . f_j / T),   y_j = sum_i A_ij c_i

(i: reference locations, j: target locations, c_i: the reference colour as a
one-hot over 16 k-means colour clusters). The loss is the cross-entropy between
y_j and the target's true cluster. Nothing tells f to track, yet to copy the
right colour it must point at where each target pixel came from. At test time
the same pointer copies object labels instead of colours: a mask given in the
first frame is carried through the whole video (DAVIS), scored by region
similarity J beside copying the first mask unchanged and beside the same
propagation with a randomly initialised f.

    python video_colorization.py                       # built-in videos with masks
    python video_colorization.py --topk 10 --radius 4  # later work's limits on the pointer (tracking only)
    python video_colorization.py --dataset davis --data-dir data/davis2016-sample --image-size 96 --crop 64 --epochs 30
    torchrun --nproc_per_node=2 video_colorization.py --dataset davis --data-dir DAVIS --backbone resnet18 --image-size 256

Departures from the paper (docs/video_colorization.md, with their measured effects):
- Each frame is embedded on its own (the paper adds a small 3D convolutional network over
  the frames), so a video's embeddings are computed once for every propagation step.
  The backbone is small and trained on built-in videos or DAVIS frames (the paper: a
  ResNet-18 at 256 px, trained on Kinetics). Not measured against the paper's.
- Tracking copies labels from the first frame and from the --track-window 3 frames before
  the target (their predicted labels), at --track-temperature 0.5 (1 in training): the
  values public re-implementations of the paper use; not checked against its text.
- Opt-in, from later work: --topk and --radius limit the pointer when tracking.
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
    DATASETS: ClassVar[tuple] = ("shapes", "davis")
    dataset: str = "shapes"  # shapes (built-in videos with masks) | davis (a DAVIS-layout folder: JPEGImages/480p/<video>/, Annotations/480p/<video>/)
    data_dir: str = "data"  # the DAVIS folder for --dataset davis (trained on its frames; its masks are used only to score tracking)
    eval_dir: str = ""  # another DAVIS folder to score tracking on (default: --data-dir, or the built-in test videos); videos the network never trained on
    image_size: int = 64  # frames are resized so the shorter side is this (paper: 256 px); J is measured at this size
    crop: int = 32  # side of the square training crop, the same in every frame of a clip (0, or larger than the frames: whole frames)
    epochs: int = 4  # sized for the 3-minute CPU budget on the built-in videos
    batch_size: int = 32  # clips per step (paper: 32)
    lr: float = 1e-3  # Adam (as the paper), warm-up then cosine decay
    weight_decay: float = 0.0
    warmup_epochs: float = 0.2
    ref_frames: int = 3  # coloured reference frames before each greyscale target (paper: 3)
    frame_gap: int = 1  # frames between consecutive frames of a training clip
    clusters: int = 16  # k-means colour clusters of the ab values (paper: 16)
    embed_dim: int = 64  # embedding size per location (paper: 64)
    temperature: float = 1.0  # softmax temperature of the pointer while training (paper: 1)
    track_temperature: float = 0.5  # softmax temperature when propagating masks (public re-implementations of the paper: 0.5)
    track_window: int = 3  # recent frames (with their predicted masks) used as references besides the first frame
    topk: int = 0  # tracking: keep only the k most similar reference locations per target location (0: all, the paper's pointer; k > 0 from later work, Lai & Xie 2019)
    radius: int = 0  # tracking: only reference locations within this many feature cells of the target location (0: anywhere, the paper's; r > 0 from later work, Lai & Xie 2019, Jabri et al. 2020)
    train_videos: int = 256  # built-in training videos (16 frames each)
    eval_videos: int = 32  # built-in test videos for tracking (24 frames each)
    strip_videos: int = 3  # videos drawn in strip.png


# ---------------------------------------------------------------------------
# Pretext data: clips of consecutive frames, and their colours as 16 clusters (paper sec. 3.2)
# ---------------------------------------------------------------------------
class Clips(torch.utils.data.Dataset):
    """Every window of `length` frames, `gap` apart, of every video, as (length, 3, H, W)
    uint8; with `crop`, a random square crop at the same place in all its frames."""

    def __init__(self, videos: list[torch.Tensor], length: int, gap: int, crop: int = 0):
        self.videos, self.length, self.gap, self.crop = videos, length, gap, crop
        span = (length - 1) * gap + 1
        self.index = [(v, s) for v, video in enumerate(videos) for s in range(len(video) - span + 1)]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        v, s = self.index[i]
        clip = self.videos[v][s:s + (self.length - 1) * self.gap + 1:self.gap]
        h, w = clip.shape[-2:]
        if self.crop and self.crop < min(h, w):
            y, x = torch.randint(h - self.crop + 1, ()).item(), torch.randint(w - self.crop + 1, ()).item()
            clip = clip[..., y:y + self.crop, x:x + self.crop]
        return clip, i


def load_videos(args: Args):
    """(training videos: list of (T, 3, H, W) uint8, videos to track: {name: (frames, masks)})."""
    if args.dataset == "shapes":
        if not 32 <= args.image_size <= 128:
            common.fail(f"the built-in videos come in 32 to 128 px, not {args.image_size}")
        # Fixed data seeds, independent of --seed, as for the built-in images.
        train, _ = common.make_videos(args.train_videos, 16, args.image_size, seed=0)
        if not args.eval_dir:
            frames, masks = common.make_videos(args.eval_videos, 24, args.image_size, seed=1)
            return list(train), {f"video{i:03d}": (frames[i], masks[i]) for i in range(len(frames))}
        train, evaluation = list(train), common.load_davis(args.eval_dir, size=args.image_size)  # real videos to track
    else:
        train = common.load_davis(args.data_dir, size=args.image_size)
        evaluation = common.load_davis(args.eval_dir, size=args.image_size) if args.eval_dir else train
        train = [frames for frames, _ in train.values()]
    tracked = {name: v for name, v in evaluation.items() if v[1] is not None}
    if args.eval and not tracked:
        common.fail(f"no Annotations/480p/<video>/ masks in {args.eval_dir or args.data_dir} to score tracking on")
    return train, tracked


def split_lab(x: torch.Tensor):
    """RGB in [0, 1], (N, 3, H, W) -> (L scaled to about [-1, 1], (N, 1, H, W); ab in Lab units)."""
    lab = common.rgb_to_lab(x)
    return lab[:, :1] / 50 - 1, lab[:, 1:]


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Lloyd's algorithm with k-means++ seeding: points (N, D) -> centres (k, D)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=gen, device=x.device)]
    for _ in range(1, k):  # k-means++: the next centre far from the chosen ones, with probability ~ d^2
        d2 = torch.cdist(x, centres).min(1).values ** 2
        centres = torch.cat([centres, x[torch.multinomial(d2 + 1e-12, 1, generator=gen)]])
    for _ in range(iters):
        ids = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def quantise(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """ab (N, 2, h, w) -> the nearest cluster's id (N, h, w)."""
    n, _, h, w = ab.shape
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    return torch.cdist(flat, centres.to(flat)).argmin(1).view(n, h, w)


# ---------------------------------------------------------------------------
# Model: the embedding network f
# ---------------------------------------------------------------------------
def dense(backbone: nn.Module) -> nn.Module:
    """Stride 1 in layer3 and layer4, so the feature map keeps the resolution of layer2
    (paper sec. 3.3: a ResNet-18 whose output is 1/8 of the input side; torchvision's
    ResNets here get 1/8, the small backbone 1/4, at 64 px and less (CIFAR stem) 1/2)."""
    for layer in (backbone.layer3, backbone.layer4):
        for m in layer[0].modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
    return backbone


class Embedder(nn.Module):
    """f: greyscale frame (L repeated over the 3 input channels, so the backbone stays a
    standard RGB one) -> an embed_dim vector per location of the dense feature map.

    The paper puts a small 3D convolutional network over the frames on top of the
    2D ResNet; here each frame is embedded on its own (a 1x1 convolution on the
    backbone's map), so a video's embeddings can be computed once and reused by
    every propagation step."""

    def __init__(self, backbone: nn.Module, width: int, dim: int):
        super().__init__()
        self.backbone = dense(backbone)
        self.head = nn.Conv2d(width, dim, 1)

    def forward(self, L):  # (N, 1, H, W), scaled L -> (N, E, h, w)
        return self.head(common.feature_map(self.backbone, L.expand(-1, 3, -1, -1)))


@torch.no_grad()
def feature_size(model: nn.Module, h: int, w: int) -> tuple[int, int]:
    """The (h, w) of f's map for (h, w) frames."""
    was_training = model.training
    out = model.eval()(torch.zeros(1, 1, h, w, device=next(model.parameters()).device)).shape[-2:]
    model.train(was_training)
    return tuple(out)


def locations(x: torch.Tensor) -> torch.Tensor:
    """(B, F, C, h, w) per-frame maps -> (B, F*h*w, C): one row per location of every frame."""
    return x.permute(0, 1, 3, 4, 2).flatten(1, 3)


# ---------------------------------------------------------------------------
# Loss: copy colours through the pointer A_ij, cross-entropy against the true cluster (paper eq. 1-3)
# ---------------------------------------------------------------------------
def copy_colors(f_ref: torch.Tensor, f_tgt: torch.Tensor, c_ref: torch.Tensor, temperature: float = 1.0):
    """y_j = sum_i A_ij c_i with A_ij = softmax over i of (f_i . f_j / temperature)  (paper eq. 1-2).

    f_ref (B, n_ref, E), f_tgt (B, n_tgt, E), c_ref (B, n_ref, D) -> y (B, n_tgt, D)."""
    logits = torch.bmm(f_ref, f_tgt.transpose(1, 2)) / temperature  # (B, n_ref, n_tgt): f_i . f_j
    A = logits.softmax(dim=1)  # normalised over the reference locations i, for every target j
    return torch.bmm(A.transpose(1, 2), c_ref)  # (B, n_tgt, D): sum_i A_ij c_i


def clip_loss(model, clip: torch.Tensor, centres: torch.Tensor, temperature: float, run=None):
    """Colourise each clip's last frame from the frames before it.

    clip (B, F, 3, H, W) RGB in [0, 1] -> (cross-entropy, cluster accuracy, copied colour
    distribution (B, h*w, K), the target's cluster ids (B, h*w))."""
    b, nf = clip.shape[:2]
    L, ab = split_lab(clip.flatten(0, 1))
    if run is None:  # evaluation: plain float32, default memory layout
        f = model(L).float()
    else:
        with run.autocast():
            f = model(run.format(L)).float()
    h, w = f.shape[-2:]
    ids = quantise(F.adaptive_avg_pool2d(ab, (h, w)), centres).view(b, nf, h * w)  # colours at feature resolution
    f = f.view(b, nf, *f.shape[1:])
    c_ref = F.one_hot(ids[:, :-1].flatten(1), len(centres)).float()  # (B, n_ref, K): c_i as one-hot clusters
    y = copy_colors(locations(f[:, :-1]), locations(f[:, -1:]), c_ref, temperature)  # (B, h*w, K)
    target = ids[:, -1]
    loss = F.nll_loss(torch.log(y.clamp(min=1e-8)).flatten(0, 1), target.flatten())
    acc = (y.argmax(-1) == target).float().mean()
    return loss, acc, y, target


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def train(args: Args):
    if args.ref_frames < 1 or args.frame_gap < 1 or args.clusters < 2 or args.embed_dim < 1:
        common.fail("--ref-frames and --frame-gap must be at least 1, --clusters at least 2, --embed-dim at least 1")
    if args.track_window < 0 or args.topk < 0 or args.radius < 0:
        common.fail("--track-window, --topk and --radius must not be negative")
    common.check_image_size(args, 16, "the backbone's downsampling")
    if 0 < args.crop < 16:
        common.fail(f"--crop {args.crop} is too small: 0 (whole frames) or at least 16 px")
    run = common.Run(args, "video_colorization")
    train_videos, tracked = load_videos(args)
    clips = Clips(train_videos, args.ref_frames + 1, args.frame_gap, args.crop)
    if len(clips) == 0:
        common.fail(f"no video has the {(args.ref_frames) * args.frame_gap + 1} frames a clip of --ref-frames "
                    f"{args.ref_frames} + 1 target at --frame-gap {args.frame_gap} needs")
    loader = run.loader(clips)

    backbone, width = common.build_backbone(args.backbone, args.image_size)
    model = run.prepare(Embedder(backbone, width, args.embed_dim))
    # The colour clusters: k-means on the ab values of training frames at feature
    # resolution (the resolution colours are copied at). Each process crops its own frames;
    # run.steps() gives every process rank 0's centres, as all it keeps in `parts`.
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(clips), (min(len(clips), 512),), generator=gen).tolist()
    _, ab = split_lab(common.to_float(torch.stack([clips[i][0][0] for i in picks]), run.device))
    ab = F.adaptive_avg_pool2d(ab, feature_size(common.unwrap(model), *ab.shape[-2:]))
    centres = kmeans(ab.permute(0, 2, 3, 1).reshape(-1, 2), args.clusters, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=run.fused)

    total_steps = args.epochs * len(loader)
    warmup = int(args.warmup_epochs * len(loader))
    parts = {"model": model, "optimizer": optimizer, "centres": centres}
    model.train()
    for step, (clip, _) in run.steps(loader, parts):
        lr = common.set_lr(optimizer, common.cosine_lr(step, total_steps, args.lr, warmup))
        x = run.to_device(clip)  # (B, F, 3, H, W): ref_frames coloured references, then the target
        flip = torch.rand(len(x), device=x.device) < 0.5  # the same flip for every frame of a clip
        x = common.select(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
        loss, acc, _, _ = clip_loss(model, x, centres, args.temperature, run)
        run.check_finite(loss)  # [plumbing] stop on nan/inf, keep the last good checkpoint
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log(len(x), loss=loss.item(), acc=acc.item(), lr=lr)  # [plumbing] progress line, log.jsonl

    net = common.unwrap(model)
    run.save_encoder(net.backbone)
    run.save_encoder(net, "embedder.pt")
    if run.is_main:  # after the loop: a resumed run's centres are the checkpoint's
        run.save(centres.cpu(), "colour_clusters.pt")
    if not run.is_main:
        return run.close()
    results = {"steps": run.step, "clusters": args.clusters, "image_size": args.image_size}
    if args.eval:
        results["pretext_top1"] = colour_accuracy(net, tracked, centres, args, run.device)
        run.print(f"colour cluster accuracy, copied from the {args.ref_frames} frames before: "
                  f"{results['pretext_top1']:.4f} (chance about {1 / args.clusters:.4f})")
        trained = track_videos(net, tracked, args, run.device)
        torch.manual_seed(args.seed)
        random_net = Embedder(common.build_backbone(args.backbone, args.image_size)[0], width,
                              args.embed_dim).to(run.device)
        random = track_videos(random_net, tracked, args, run.device)
        results.update({"J": trained["J"], "J_random_init": random["J"], "J_copy_first": trained["J_copy_first"],
                        "objects": trained["objects"], "videos": len(tracked),
                        "J_per_video": trained["J_per_video"], "J_per_video_random_init": random["J_per_video"]})
        if trained["J"] is None:
            run.print(f"J not scored: the {len(tracked)} videos to track are annotated on their first frame only "
                      f"(masks propagated, drawn in strip.png)")
        else:
            run.print(f"J (region similarity, {trained['objects']} objects in {len(tracked)} videos): {trained['J']:.4f}"
                      f" | random init {random['J']:.4f} | first mask copied {trained['J_copy_first']:.4f}")
        save_strip(net, tracked, trained, centres, args, run.device, run.out / "strip.png")
        run.print(f"picture strip: {run.out / 'strip.png'}")
    run.finish(results)
    return results


# ---------------------------------------------------------------------------
# Evaluation: the same pointer with object labels in place of colours (tracking), and pictures
# ---------------------------------------------------------------------------
def _neighbourhood(h: int, w: int, radius: int, device) -> torch.Tensor:
    """(h*w, h*w) bool: reference location i within `radius` cells (Chebyshev) of target j."""
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    r, c = r.flatten(), c.flatten()
    return ((r[:, None] - r[None, :]).abs() <= radius) & ((c[:, None] - c[None, :]).abs() <= radius)


def propagate_masks(feats: torch.Tensor, first_mask: torch.Tensor, num_objects: int | None = None,
                    window: int = 3, temperature: float = 0.5, topk: int = 0, radius: int = 0) -> torch.Tensor:
    """Carry the first frame's mask through a video with the colourisation pointer.

    feats (T, E, h, w): the embedding of every frame; first_mask (H, W): object ids,
    0 = background. Each frame t copies label distributions from the first frame (its
    given mask) and from the `window` frames before t (their own predicted
    distributions), with A as in copy_colors. Returns masks (T, H, W) long; frame 0 is
    the given mask. Labels live at feature resolution; predictions are upsampled
    bilinearly to (H, W) before the arg-max."""
    t_all, e, h, w = feats.shape
    big = first_mask.shape
    k = int(first_mask.max()) + 1 if num_objects is None else num_objects + 1
    onehot = F.one_hot(first_mask.long(), k).permute(2, 0, 1).float()  # (K, H, W)
    labels = [F.adaptive_avg_pool2d(onehot[None], (h, w))[0].flatten(1).T]  # frame 0: (h*w, K)
    f = feats.flatten(2).transpose(1, 2)  # (T, h*w, E)
    # Locations out of reach, for the largest reference set (first frame + window), built once.
    far = ~_neighbourhood(h, w, radius, feats.device).repeat(1, window + 1) if radius > 0 else None
    out = [first_mask.long()]
    for t in range(1, t_all):
        refs = [0] + [s for s in range(max(1, t - window), t)]
        f_ref = torch.cat([f[s] for s in refs])  # (R*h*w, E)
        c_ref = torch.cat([labels[s] for s in refs])  # (R*h*w, K)
        # Rows are target locations j here (the transpose of copy_colors' A), so the
        # softmax over the reference locations i runs along contiguous memory.
        logits = (f[t] @ f_ref.T) / temperature  # (h*w, R*h*w): f_i . f_j / T
        if far is not None:
            logits = logits.masked_fill(far[:, :f_ref.shape[0]], float("-inf"))
        if 0 < topk < f_ref.shape[0]:
            kth = logits.topk(topk, dim=1).values[:, -1:]  # the k-th largest per target location
            logits = logits.masked_fill(logits < kth, float("-inf"))
        y = logits.softmax(dim=1) @ c_ref  # (h*w, K): sum_i A_ij c_i
        labels.append(y)
        up = F.interpolate(y.T.reshape(1, k, h, w), size=big, mode="bilinear", align_corners=False)[0]
        out.append(up.argmax(0))
    return torch.stack(out)


def region_similarity(pred: torch.Tensor, gt: torch.Tensor) -> list[float]:
    """J per object (DAVIS): the IoU of predicted and true mask, averaged over the frames
    after the first (a frame where both are empty counts 1). Objects: the ids in gt[0]."""
    scores = []
    for obj in gt[0].unique().tolist():
        if obj == 0:
            continue
        p, g = pred[1:] == obj, gt[1:] == obj
        inter = (p & g).flatten(1).sum(1).float()
        union = (p | g).flatten(1).sum(1).float()
        scores.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean().item())
    return scores


@torch.no_grad()
def embed_video(model: nn.Module, frames: torch.Tensor, device, chunk: int = 16) -> torch.Tensor:
    """uint8 frames (T, 3, H, W) -> embeddings (T, E, h, w), float32."""
    parts = []
    for s in range(0, len(frames), chunk):
        L, _ = split_lab(common.to_float(frames[s:s + chunk], device))
        parts.append(model(L).float())
    return torch.cat(parts)


@torch.no_grad()
def track_videos(model: nn.Module, videos: dict, args: Args, device) -> dict:
    """Mean J over all objects of all videos: propagated masks, and copying the first mask.

    videos: {name: (frames (T, 3, H, W) uint8, masks (T, H, W) uint8)}; a video whose masks
    are (1, H, W), the first frame's only, is propagated but not scored (J None if none is)."""
    was_training = model.training
    model.eval()
    j_prop, j_copy, per_video, predictions = [], [], {}, {}
    for name, (frames, masks) in videos.items():
        gt = masks.to(device).long()
        feats = embed_video(model, frames, device)
        pred = propagate_masks(feats, gt[0], window=args.track_window, temperature=args.track_temperature,
                               topk=args.topk, radius=args.radius)
        predictions[name] = pred.cpu()
        if len(gt) < len(frames):  # the first frame's mask only (DAVIS-2017 test-dev): propagated, not scored
            continue
        scores = region_similarity(pred, gt)
        copied = region_similarity(gt[:1].expand_as(gt), gt)
        j_prop += scores
        j_copy += copied
        per_video[name] = sum(scores) / max(len(scores), 1)
    model.train(was_training)
    mean = (lambda xs: sum(xs) / len(xs)) if j_prop else (lambda xs: None)
    return {"J": mean(j_prop), "J_copy_first": mean(j_copy),
            "objects": len(j_prop), "J_per_video": per_video, "predictions": predictions}


@torch.no_grad()
def colour_accuracy(model, videos: dict, centres, args: Args, device) -> float:
    """How often the copied colour's most likely cluster is the target's true cluster, on
    every clip of the tracked videos (held-out for the built-in data)."""
    model.eval()
    correct = total = 0
    for frames, _ in videos.values():
        clips = Clips([frames], args.ref_frames + 1, args.frame_gap)
        for s in range(0, len(clips), 16):
            x = common.to_float(torch.stack([clips[i][0] for i in range(s, min(s + 16, len(clips)))]), device)
            _, _, y, target = clip_loss(model, x, centres, args.temperature)
            correct += (y.argmax(-1) == target).sum().item()
            total += target.numel()
    model.train()
    return correct / max(total, 1)


PALETTE = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                        [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]]) / 255


def overlay(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Frames (T, 3, H, W) in [0, 1] with each object's pixels tinted by its palette colour."""
    colours = PALETTE.to(frames)[masks.long() % len(PALETTE)].permute(0, 3, 1, 2)
    return torch.where(masks.unsqueeze(1) > 0, 0.45 * frames + 0.55 * colours, frames)


@torch.no_grad()
def colourise_video(model, frames: torch.Tensor, centres: torch.Tensor, args: Args, device) -> torch.Tensor:
    """Every frame from ref_frames on coloured by copying from the ref_frames true-colour
    frames before it; the expected cluster colour at feature resolution, upsampled, with
    the frame's own L. Returns RGB (T - ref_frames, 3, H, W)."""
    x = common.to_float(frames, device)
    L, ab = split_lab(x)
    f = model(L).float()
    h, w = f.shape[-2:]
    ids = quantise(F.adaptive_avg_pool2d(ab, (h, w)), centres)
    out = []
    for t in range(args.ref_frames, len(frames)):
        refs = slice(t - args.ref_frames, t)
        c_ref = F.one_hot(ids[refs].flatten(), len(centres)).float()[None]
        y = copy_colors(locations(f[None, refs]), locations(f[None, t:t + 1]), c_ref, args.temperature)[0]
        ab_hat = (y @ centres.to(y)).T.reshape(1, 2, h, w)
        ab_hat = F.interpolate(ab_hat, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out.append(common.lab_to_rgb(torch.cat([(L[t:t + 1] + 1) * 50, ab_hat], 1))[0])
    return torch.stack(out)


@torch.no_grad()
def save_strip(model, videos: dict, tracked: dict, centres, args: Args, device, path, columns: int = 8):
    """Per video, three rows: frames, propagated masks on the frames, colourised frames."""
    model.eval()
    rows = []
    for name in list(videos)[:args.strip_videos]:
        frames, _ = videos[name]
        pred = tracked["predictions"][name]
        picks = torch.linspace(args.ref_frames, len(frames) - 1, columns).round().long()
        x = frames.float() / 255
        rows += [x[picks], overlay(x[picks], pred[picks]),
                 colourise_video(model, frames, centres, args, device).cpu()[picks - args.ref_frames]]
    model.train()
    common.save_picture(path, torch.cat(rows), nrow=columns)


def main(argv=None):
    return common.run_main(train, Args, argv, __doc__)


if __name__ == "__main__":
    common.cli(main)
