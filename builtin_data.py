"""The built-in data: procedural images of 10 classes and videos with masks, from a seed.

No download, the same pixels on every machine. common.py loads this file only for
--dataset shapes (and video_colorization.py's built-in videos); a copier who brings
their own data can leave it out.

    python builtin_data.py preview --out docs     # save sample grids of the images and videos
    python builtin_data.py shortcut               # how far colour gives lightness away, pixel by pixel
    python builtin_data.py shortcut --folder data/cifar10-jpg/train   # the same for photos
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from common import _hsv_to_rgb, cli, fail, lab_to_rgb, rgb_to_lab


# ---------------------------------------------------------------------------
# Built-in images ("shapes"): 10 upright objects on sky and ground, from a seed
# ---------------------------------------------------------------------------
SHAPE_CLASSES = ("house", "tree", "mushroom", "snowman", "car", "rocket", "cup", "letter_t", "flag", "pyramid")

# Two colour parts per class (main, detail), each a few base RGB colours. Classes
# share colours on purpose, so a probe must use shape; within a class colour is
# predictable from the part, which gives colorization something to learn.
_PALETTES = {
    "house": ([(0.85, 0.78, 0.62), (0.70, 0.30, 0.22), (0.90, 0.90, 0.85)], [(0.65, 0.15, 0.12), (0.30, 0.30, 0.35)]),
    "tree": ([(0.45, 0.30, 0.15)], [(0.15, 0.55, 0.15), (0.30, 0.65, 0.20), (0.85, 0.50, 0.10)]),
    "mushroom": ([(0.92, 0.88, 0.75)], [(0.80, 0.12, 0.10), (0.55, 0.35, 0.20)]),
    "snowman": ([(0.95, 0.95, 0.97), (0.85, 0.88, 0.95)], [(0.95, 0.95, 0.97), (0.90, 0.60, 0.30)]),
    "car": ([(0.80, 0.10, 0.10), (0.10, 0.25, 0.75), (0.95, 0.80, 0.10)], [(0.08, 0.08, 0.08)]),
    "rocket": ([(0.85, 0.85, 0.90), (0.95, 0.95, 0.95)], [(0.85, 0.15, 0.10), (0.10, 0.25, 0.75)]),
    "cup": ([(0.95, 0.95, 0.90), (0.20, 0.55, 0.80), (0.85, 0.50, 0.10)], [(0.95, 0.95, 0.90), (0.30, 0.30, 0.35)]),
    "letter_t": ([(0.10, 0.25, 0.75), (0.80, 0.10, 0.10)], [(0.95, 0.80, 0.10), (0.15, 0.55, 0.15)]),
    "flag": ([(0.50, 0.50, 0.55)], [(0.80, 0.10, 0.10), (0.10, 0.25, 0.75), (0.95, 0.80, 0.10)]),
    "pyramid": ([(0.85, 0.72, 0.45), (0.75, 0.60, 0.35)], [(0.30, 0.20, 0.10)]),
}
# Each part's lightness (L, 0-100), drawn apart from its colour: a red car body and a red
# mushroom cap share ab but not L, so the colour of a part does not give its lightness
# away (nor its lightness the colour); what does is which part it is.
_TONES = {"house": (78, 42), "tree": (35, 58), "mushroom": (82, 48), "snowman": (88, 70), "car": (55, 22),
          "rocket": (80, 45), "cup": (68, 50), "letter_t": (50, 66), "flag": (60, 44), "pyramid": (72, 30)}
_SKIES = [((0.25, 0.45, 0.85), (0.65, 0.80, 0.95)), ((0.35, 0.30, 0.60), (0.95, 0.60, 0.40)),
          ((0.55, 0.60, 0.65), (0.80, 0.82, 0.85))]  # (zenith, horizon): day, dusk, overcast
_GROUNDS = [(0.25, 0.50, 0.15), (0.45, 0.32, 0.18), (0.80, 0.70, 0.45), (0.35, 0.38, 0.20)]  # grass, soil, sand, moss


def _box(u, v, u0, u1, v0, v1):
    return torch.maximum(torch.maximum(u0 - u, u - u1), torch.maximum(v0 - v, v - v1))


def _circle(u, v, cu, cv, r):
    return torch.sqrt((u - cu) ** 2 + (v - cv) ** 2) - r


def _triangle(u, v, apex_v, base_v, half_width, cu=0.0):
    """Isosceles triangle, apex above the base (signed distance of the half-planes)."""
    h = apex_v - base_v
    side = (h * (u - cu).abs() + half_width * (v - base_v) - half_width * h) / math.hypot(h, half_width)
    return torch.maximum(base_v - v, side)


def _shape_parts(name, u, v):
    """Signed distances (negative inside) of the (main, detail) parts in object coordinates:
    u across (about -0.5..0.5), v up from the base (0..1)."""
    if name == "house":
        return _box(u, v, -0.35, 0.35, 0, 0.55), _triangle(u, v, 1.0, 0.55, 0.47)
    if name == "tree":
        return _box(u, v, -0.08, 0.08, 0, 0.45), _circle(u, v, 0, 0.68, 0.3)
    if name == "mushroom":
        return _box(u, v, -0.1, 0.1, 0, 0.5), torch.maximum(_circle(u, v, 0, 0.48, 0.45), 0.48 - v)
    if name == "snowman":
        body = torch.minimum(_circle(u, v, 0, 0.22, 0.22), _circle(u, v, 0, 0.56, 0.16))
        return body, _circle(u, v, 0, 0.82, 0.12)
    if name == "car":
        body = torch.minimum(_box(u, v, -0.5, 0.5, 0.12, 0.4), _box(u, v, -0.28, 0.2, 0.4, 0.66))
        return body, torch.minimum(_circle(u, v, -0.3, 0.12, 0.12), _circle(u, v, 0.3, 0.12, 0.12))
    if name == "rocket":
        fins = _triangle(u, v, 0.5, 0.0, 0.32)
        return _box(u, v, -0.13, 0.13, 0.05, 0.72), torch.minimum(_triangle(u, v, 1.0, 0.72, 0.13), fins)
    if name == "cup":
        bowl = torch.maximum(_box(u, v, -0.3, 0.3, 0, 0.7), -_box(u, v, -0.2, 0.2, 0.12, 0.8))
        handle = (_circle(u, v, 0.36, 0.38, 0.15).abs() - 0.045)
        return bowl, torch.maximum(handle, 0.3 - u)
    if name == "letter_t":
        return _box(u, v, -0.42, 0.42, 0.78, 1.0), _box(u, v, -0.1, 0.1, 0, 0.78)
    if name == "flag":
        return _box(u, v, -0.25, -0.19, 0, 1.0), _box(u, v, -0.19, 0.3, 0.6, 0.95)
    if name == "pyramid":
        return _triangle(u, v, 0.9, 0.0, 0.48), _box(u, v, -0.08, 0.08, 0, 0.25)
    raise ValueError(name)


def _smooth_noise(n: int, size: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) noise in [0, 1] with about `cells` blobs across the image."""
    coarse = torch.rand(n, 1, cells + 1, cells + 1, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(0, 1)


def _pick_colours(options, n, gen, jitter=0.06):
    base = torch.tensor(options)[torch.randint(len(options), (n,), generator=gen)]
    return (base + jitter * torch.randn(n, 3, generator=gen)).clamp(0, 1)


def _ab(rgb: torch.Tensor) -> torch.Tensor:
    """The ab of sRGB colours (n, 3) -> (n, 2, 1, 1): their hue and chroma, without their lightness."""
    return rgb_to_lab(rgb.clamp(0, 1).view(-1, 3, 1, 1))[:, 1:]


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=gen)).view(n, 1, 1, 1)


def _render_shapes(labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Images (n, 3, size, size) in [0, 1], composed in CIE Lab: every region takes its
    colour (ab) and its lightness (L) from separate draws, so that neither predicts the
    other pixel by pixel (as in photos: the same paint is light in the sun and dark in the
    shade). Lightness follows the layout instead: each part of an object has its own
    tone, the sky brightens towards the horizon and the ground darkens towards the viewer."""
    n = len(labels)
    coords = (torch.arange(size) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)

    # Sky: zenith-to-horizon gradient with soft clouds. Ground: a palette colour with
    # texture, darker towards the viewer. The horizon is slightly wavy.
    sky_id = torch.randint(len(_SKIES), (n,), generator=gen)
    zenith = _ab(torch.tensor([s[0] for s in _SKIES])[sky_id] + 0.05 * torch.randn(n, 3, generator=gen))
    horizon_ab = _ab(torch.tensor([s[1] for s in _SKIES])[sky_id] + 0.05 * torch.randn(n, 3, generator=gen))
    zenith_L = _uniform(n, 35, 75, gen)
    horizon_L = (zenith_L + _uniform(n, 0, 25, gen)).clamp(max=95)
    horizon = 0.55 + 0.2 * torch.rand(n, 1, 1, generator=gen)
    wave = 0.03 * torch.sin(2 * math.pi * (x * torch.rand(n, 1, 1, generator=gen) * 2
                                           + torch.rand(n, 1, 1, generator=gen)))
    t = (y / horizon).clamp(0, 1).unsqueeze(1)  # 0 at the top, 1 at the horizon
    sky = torch.cat([zenith_L * (1 - t) + horizon_L * t, zenith * (1 - t) + horizon_ab * t], dim=1)
    clouds = ((_smooth_noise(n, size, 4, gen) - 0.55) * 4).clamp(0, 1) * (1 - t) * 0.8
    sky = sky * (1 - clouds) + clouds * torch.tensor([95.0, 0, 0]).view(1, 3, 1, 1)
    ground_ab = _ab(_pick_colours(_GROUNDS, n, gen, 0.05))
    texture = 0.75 + 0.25 * _smooth_noise(n, size, max(4, size // 4), gen) + 0.08 * torch.rand(n, 1, size, size, generator=gen)
    depth = ((y - horizon) / (1 - horizon)).clamp(0, 1).unsqueeze(1)
    ground_L = _uniform(n, 40, 80, gen) * texture * (1.0 - 0.35 * depth)
    ground = torch.cat([ground_L, ground_ab.expand(-1, -1, size, size)], dim=1)
    in_ground = ((y - horizon - wave) * size + 0.5).clamp(0, 1).unsqueeze(1)
    image = sky * (1 - in_ground) + ground * in_ground
    # Half the images are "studio" shots: an even texture with no horizon and no
    # vertical gradient. Without them the sky/ground split alone tells rotation
    # which way is up and the network never needs to look at the object.
    studio = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1)
    backdrop_ab = _ab(torch.rand(n, 3, generator=gen) * 0.6 + 0.2)
    backdrop_L = _uniform(n, 30, 85, gen) * (0.85 + 0.3 * _smooth_noise(n, size, max(3, size // 6), gen))
    backdrop = torch.cat([backdrop_L, backdrop_ab.expand(-1, -1, size, size)], dim=1)
    image = torch.where(studio, backdrop, image)

    # The object stands on the ground, upright (tilt of at most 10 degrees).
    scale = 0.35 + 0.25 * torch.rand(n, generator=gen)
    base = horizon.view(n) + (1 - horizon.view(n)) * 0.7 * torch.rand(n, generator=gen)
    base = torch.where(studio.view(n), 0.45 + 0.5 * torch.rand(n, generator=gen), base)  # anywhere in a studio
    base = torch.minimum(base, 0.97 * torch.ones(n))
    scale = torch.minimum(scale, base - 0.03)
    cx = 0.5 + (0.5 - 0.32 * scale - 0.05) * (2 * torch.rand(n, generator=gen) - 1)
    tilt = math.radians(10) * (2 * torch.rand(n, generator=gen) - 1)
    s, b, c, tl = scale.view(n, 1, 1), base.view(n, 1, 1), cx.view(n, 1, 1), tilt.view(n, 1, 1)
    du, dv = (x - c) / s, (b - y) / s
    u = du * torch.cos(tl) + dv * torch.sin(tl)
    v = -du * torch.sin(tl) + dv * torch.cos(tl)
    brightness = 0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen)  # of the whole object, on its lightness
    stripes = torch.rand(n, generator=gen) < 0.35
    freq = 4 + 8 * torch.rand(n, 1, 1, generator=gen)
    pattern = torch.where(stripes.view(n, 1, 1), 0.85 + 0.15 * torch.sign(torch.sin(freq * math.pi * (u + v))),
                          0.9 + 0.1 * _smooth_noise(n, size, 6, gen)[:, 0])
    for k, name in enumerate(SHAPE_CLASSES):
        idx = (labels == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        main, detail = _shape_parts(name, u[idx], v[idx])
        for d, options, tone in zip((main, detail), _PALETTES[name], _TONES[name]):
            ab = _ab(_pick_colours(options, len(idx), gen))  # the part's colour, from its palette
            L = (tone + 16 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5)) * brightness[idx]  # its own tone
            paint = torch.cat([L * pattern[idx].unsqueeze(1), ab.expand(-1, -1, size, size)], dim=1)
            # Anti-aliased coverage: signed distance in pixels, half a pixel either side.
            alpha = (0.5 - d * s[idx] * size).clamp(0, 1).unsqueeze(1)
            image[idx] = image[idx] * (1 - alpha) + paint * alpha
    return lab_to_rgb(image)


def make_shapes(num: int, size: int = 32, seed: int = 0, chunk: int = 1000):
    """The built-in image dataset: `num` uint8 images (num, 3, size, size) and labels (num,).

    Same seed, same images on every machine. Classes are balanced and in random order."""
    if not 16 <= size <= 256:
        fail(f"the built-in shapes render 16 to 256 px, not {size}")
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num) % len(SHAPE_CLASSES))[torch.randperm(num, generator=gen)]
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)
    for start in range(0, num, chunk):
        part = labels[start:start + chunk]
        images[start:start + chunk] = (_render_shapes(part, size, gen) * 255).round().to(torch.uint8)
    return images, labels


# ---------------------------------------------------------------------------
# Built-in videos: coloured shapes that move, deform and occlude, with masks
# ---------------------------------------------------------------------------
def make_videos(num: int = 64, frames: int = 16, size: int = 64, objects: int = 3, seed: int = 0):
    """Clips (num, frames, 3, size, size) uint8 and masks (num, frames, size, size) uint8.

    Mask values: 0 background, 1..objects the object in front at that pixel. Each
    object keeps its colour and texture; it moves with constant velocity (bouncing off
    the border), rotates, and its axes breathe, so shape changes over time. Later
    objects are drawn in front of earlier ones, so they occlude each other."""
    gen = torch.Generator().manual_seed(seed)
    coords = (torch.arange(size) + 0.5) / size
    y, x = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    t = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1)

    # Textured background, drifting slowly: two tinted noise layers.
    bg_a, bg_b = torch.rand(num, 3, generator=gen), torch.rand(num, 3, generator=gen)
    pad = size // 2
    noise = _smooth_noise(num, size + pad, 6, gen)
    drift = (torch.rand(num, 2, generator=gen) * 2 - 1) * 0.5  # pixels per frame
    video = torch.empty(num, frames, 3, size, size)
    for f in range(frames):
        oy = (pad // 2 + drift[:, 0] * f).round().long().clamp(0, pad)
        ox = (pad // 2 + drift[:, 1] * f).round().long().clamp(0, pad)
        for i in range(num):
            n = noise[i, :, oy[i]:oy[i] + size, ox[i]:ox[i] + size]
            video[i, f] = bg_a[i].view(3, 1, 1) * n + bg_b[i].view(3, 1, 1) * (1 - n)
    video = 0.6 * video + 0.2
    masks = torch.zeros(num, frames, size, size, dtype=torch.uint8)

    present = torch.ones(num, objects, dtype=torch.bool)
    present[:, 2:] = torch.rand(num, max(objects - 2, 0), generator=gen) < 0.7  # 2 or 3 objects
    for o in range(objects):
        hue = torch.rand(num, generator=gen)
        colour = _hsv_to_rgb(hue, 0.6 + 0.4 * torch.rand(num, generator=gen), 0.7 + 0.3 * torch.rand(num, generator=gen))
        p0 = 0.25 + 0.5 * torch.rand(num, 2, generator=gen)
        vel = (torch.rand(num, 2, generator=gen) * 2 - 1) * 0.03
        pos = p0.view(num, 1, 2) + vel.view(num, 1, 2) * t.view(1, frames, 1)
        pos = 1 - (1 - pos.remainder(2)).abs()  # reflect off the borders of [0, 1]
        pos = 0.1 + 0.8 * pos
        r = 0.1 + 0.08 * torch.rand(num, 2, generator=gen)
        phase, speed = 2 * math.pi * torch.rand(num, generator=gen), 0.3 * torch.rand(num, generator=gen) + 0.1
        breathe = 0.25 * torch.sin(speed.view(num, 1) * t.view(1, frames) + phase.view(num, 1))
        rx = (r[:, :1] * (1 + breathe)).view(num, frames, 1, 1)
        ry = (r[:, 1:] * (1 - breathe)).view(num, frames, 1, 1)
        angle = (2 * math.pi * torch.rand(num, 1, generator=gen)
                 + 0.1 * (torch.rand(num, 1, generator=gen) * 2 - 1) * t.view(1, frames)).view(num, frames, 1, 1)
        power = (2 + 3 * torch.rand(num, generator=gen)).view(num, 1, 1, 1)  # 2: ellipse, larger: rounded box
        dx, dy = x - pos[..., 1].view(num, frames, 1, 1), y - pos[..., 0].view(num, frames, 1, 1)
        u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / rx
        v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / ry
        inside = (u.abs() ** power + v.abs() ** power) < 1
        inside &= present[:, o].view(num, 1, 1, 1)
        stripes = 0.8 + 0.2 * torch.sign(torch.sin(3 * math.pi * u))  # texture moves with the object
        paint = colour.view(num, 1, 3, 1, 1) * stripes.unsqueeze(2)
        video = torch.where(inside.unsqueeze(2), paint, video)
        masks[inside] = o + 1
    return (video.clamp(0, 1) * 255).round().to(torch.uint8), masks


# ---------------------------------------------------------------------------
# python builtin_data.py preview | shortcut: look at the built-in data
# ---------------------------------------------------------------------------
def explained(target: torch.Tensor, keys: torch.Tensor) -> float:
    """R^2 of predicting `target` (P,) by the mean target of its key's group (keys (P, D),
    integers): the share of target's variance that the key alone explains."""
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    count = torch.bincount(group).float()
    mean = torch.zeros(len(count)).index_add_(0, group, target) / count
    return 1 - float(((target - mean[group]) ** 2).mean() / target.var())


def colour_shortcut(images: torch.Tensor) -> tuple[float, float]:
    """uint8 images (N, 3, H, W) -> (how much of a pixel's lightness its colour explains, and
    how much of its colour (a and b, averaged) its lightness explains), each the R^2 of the
    mean within bins (ab in bins of 5, L in bins of 2). What colorization and split-brain
    could learn pixel by pixel, without looking at shapes."""
    lab = rgb_to_lab(images.float() / 255)
    L, ab = lab[:, 0].flatten(), lab[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2)
    L_bins = torch.round(L / 2).long()[:, None]
    return (explained(L, torch.round(ab / 5).long()),
            (explained(ab[:, 0], L_bins) + explained(ab[:, 1], L_bins)) / 2)


def _shortcut(a):
    import random
    if a.folder:
        from common import IMAGE_EXTENSIONS, read_image
        files = sorted(p for p in Path(a.folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            fail(f"no images in {a.folder}")
        random.Random(0).shuffle(files)
        images = torch.stack([F.interpolate(read_image(f)[None].float(), size=(a.size, a.size), mode="bilinear",
                                            antialias=True)[0].round().to(torch.uint8) for f in files[:a.images]])
        what = f"{len(images)} images of {a.folder} at {a.size} px"
    else:
        images, what = make_shapes(a.images, a.size, seed=0)[0], f"{a.images} built-in images at {a.size} px"
    L_from_ab, ab_from_L = colour_shortcut(images)
    print(f"{what}: a pixel's colour (ab) explains {L_from_ab:.2f} of its lightness's variance (R^2), "
          f"its lightness {ab_from_L:.2f} of its colour's")


def _preview(argv=None):
    import torchvision.utils as vutils
    p = argparse.ArgumentParser(description="Save sample grids of the built-in images and videos, or measure how "
                                            "far a pixel's colour gives its lightness away (and back).")
    p.add_argument("command", choices=["preview", "shortcut"])
    p.add_argument("--out", default="docs", help="preview: folder for shapes.png and videos.png")
    p.add_argument("--size", type=int, default=64, help="image size of the samples")
    p.add_argument("--folder", default="", help="shortcut: measure the images under this folder instead")
    p.add_argument("--images", type=int, default=2000, help="shortcut: how many images")
    a = p.parse_args(argv)
    if a.command == "shortcut":
        return _shortcut(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = make_shapes(200, a.size, seed=0)
    rows = [images[labels == k][:10] for k in range(len(SHAPE_CLASSES))]  # one row per class
    vutils.save_image(torch.cat(rows).float() / 255, out / "shapes.png", nrow=10, padding=1)
    clips, masks = make_videos(4, 8, a.size, seed=0)
    palette = torch.tensor([[0, 0, 0], [255, 80, 80], [80, 255, 80], [80, 80, 255]], dtype=torch.uint8)
    strip = torch.cat([torch.cat([clips[i], palette[masks[i].long()].permute(0, 3, 1, 2)]) for i in range(4)])
    vutils.save_image(strip.float() / 255, out / "videos.png", nrow=8, padding=1)
    print(f"wrote {out / 'shapes.png'} (a row per class: {', '.join(SHAPE_CLASSES)}) and {out / 'videos.png'}")


if __name__ == "__main__":
    cli(_preview)
