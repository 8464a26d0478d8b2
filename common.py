"""Shared plumbing for the method files: config, data, backbones, evaluation, runs.

Nothing here is specific to one self-supervised method. Each method file
(rotation.py, simclr.py, ...) imports this module and keeps its own pretext
data, model, loss and training loop, so it can be read beside the lecture.
The built-in data lives in builtin_data.py, loaded only when used.

What the method files use, by section (everything else is internal):

    config and errors   Args, parse_args, run_main, cli, fail, check_image_size, RunError, Stopped
    colour space        rgb_to_lab, lab_to_rgb
    data                load_image_data, load_davis, make_shapes, make_videos (builtin_data.py),
                        to_float, WholeImages, MEAN, STD
    augmentation        random_resized_crop, centre_squares, random_crop_flip, color_jitter,
                        random_grayscale, gaussian_blur, Normalize
    backbones           build_backbone, feature_map
    evaluation          evaluate (through Run.finish), extract_features, knn_accuracy, linear_probe
    the run             Run: loader, prepare, steps, to_device, format, autocast, log, check_finite,
                        save_encoder, finish (the evaluation too), print; set_lr, cosine_lr, unwrap,
                        gather, gather_with_grad
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

DATASETS = ("shapes", "cifar10", "cifar100", "stl10", "folder")
_BUILTIN = ("SHAPE_CLASSES", "make_shapes", "make_videos")  # in builtin_data.py, imported when first used


def __getattr__(name):
    """common.make_shapes, common.make_videos, common.SHAPE_CLASSES: the built-in data lives in
    builtin_data.py, loaded only when it is used, so a copier who brings their own data can
    leave that file out."""
    if name in _BUILTIN:
        return getattr(_builtin_data(), name)
    raise AttributeError(f"module 'common' has no attribute {name!r}")


def _builtin_data():
    try:
        import builtin_data
    except ModuleNotFoundError:
        fail("the built-in data needs builtin_data.py beside common.py (copy it from the repository), "
             "or use your own data: --dataset folder --data-dir DIR")
    return builtin_data
BACKBONES = ("small", "resnet18", "resnet50")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------
# Config: a dataclass whose trailing comments become the --help text
# ---------------------------------------------------------------------------
@dataclass
class Args:
    """Options every method shares. A method subclasses this and adds its own."""

    dataset: str = "shapes"  # shapes (built-in, no files) | cifar10 | cifar100 | stl10 | folder
    data_dir: str = "data"  # where cifar10/cifar100/stl10 live, or the image folder for --dataset folder
    download: bool = False  # let torchvision download cifar10/cifar100/stl10 into --data-dir
    image_size: int = 32  # side of the square images the networks see (image folders: see --load-size)
    load_size: int = 0  # image folders: shorter side at which whole training images are kept, for the method to crop (0: its own, see its doc; most: image_size / 0.875)
    backbone: str = "small"  # small (CPU default) | resnet18 | resnet50 (CIFAR stem at <= 64 px)
    epochs: int = 5  # passes over the pretraining set
    batch_size: int = 128  # images per optimiser step and per process (under torchrun, global = this x processes)
    lr: float = 0.1  # peak learning rate, reached after warm-up, then cosine decay
    workers: int = 4  # data loader processes for image folders read from disk (in-memory data uses none)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    seed: int = 0  # seed for initialisation, data order and augmentation
    amp: bool = True  # bf16 autocast on CUDA; ignored on other devices
    compile: bool = False  # torch.compile the networks (pays on GPUs after a warm-up of a minute or so; not on 2 CPU cores)
    out: str = ""  # run folder of a new run (never one that holds a checkpoint); default runs/<method>-<date>-<time>
    resume: str = ""  # continue the run in this folder with its own options: a bare --resume DIR is enough
    max_steps: int = 0  # stop after this many optimiser steps in all (0: no limit); for quick runs and tests
    save_every: float = 30.0  # minutes between checkpoints inside an epoch (0: only at epoch ends and on a signal)
    eval: bool = True  # evaluate the encoder at the end (kNN and linear probe, trained and random init)
    monitor_every: int = 1  # kNN learning curve every N epochs (0: off); spaced out to stay under 10% of the time
    log_every: float = 5.0  # seconds between progress lines


MAX_IMAGE_SIZE = 1024
# Options that must be above zero; every other number must not be negative.
_POSITIVE = ("epochs", "batch_size", "image_size", "lr", "temperature", "track_temperature")
# --resume: options that may differ from the run's without changing what a step computes
# (--epochs only upward: a longer schedule), and options that belong to one command, not to the run.
RESUME_MAY_CHANGE = ("epochs", "workers", "log_every", "eval", "device", "save_every", "download", "compile",
                     "monitor_every")
_PER_COMMAND = ("resume", "out", "max_steps")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        fail(f"{message} (see --help)")


def _field_comments(cls) -> dict[str, str]:
    """Trailing `# comment` of each dataclass field, collected over the class hierarchy."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n#]*=[^#\n]*#\s?(.*)$", source, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _build_parser(cls, doc: str | None, given_only: bool = False) -> argparse.ArgumentParser:
    """The command line of `cls`; given_only: without defaults, so it returns only what was typed."""
    helps = _field_comments(cls)
    parser = _Parser(description=doc, formatter_class=_Formatter)
    for f in fields(cls):
        default = argparse.SUPPRESS if given_only else f.default
        text = helps.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        if isinstance(f.default, bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(_flag(f.name), type=type(f.default), default=default, help=text,
                                metavar=f.name.upper())
    return parser


def parse_args(cls, argv=None, doc: str | None = None):
    """Build an argparse command line from the dataclass `cls` and parse argv into it.

    With --resume DIR the options are the run's own (its checkpoint holds them); options
    typed beside it must equal the run's or be among RESUME_MAY_CHANGE."""
    args = cls(**vars(_build_parser(cls, doc).parse_args(argv)))
    if args.resume:
        given = vars(_build_parser(cls, doc, given_only=True).parse_args(argv))
        args = _resumed_args(cls, args, given)
    _check_args(cls, args)
    return args


def _check_args(cls, args):
    datasets = getattr(cls, "DATASETS", DATASETS)  # a method with other data (videos) names its own
    if args.dataset not in datasets:
        fail(f"unknown dataset '{args.dataset}' (choose from {', '.join(datasets)})")
    if args.backbone not in BACKBONES:
        fail(f"unknown backbone '{args.backbone}' (choose from {', '.join(BACKBONES)})")
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            fail(f"{_flag(f.name)} must be a finite number, not {value}")
        if f.name in _POSITIVE and value <= 0:
            fail(f"{_flag(f.name)} must be {'at least 1' if isinstance(value, int) else 'above 0'}, not {value}")
        if value < 0:
            fail(f"{_flag(f.name)} must not be negative, not {value}")
    if args.image_size > MAX_IMAGE_SIZE:
        fail(f"--image-size {args.image_size} is larger than the {MAX_IMAGE_SIZE} px this code supports "
             f"(ImageNet training uses 224)")
    pick_device(args.device)  # an unknown or absent device fails now, not after the data is loaded


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint.pt, or a one-line error saying why it cannot be read."""
    if not path.is_file():
        fail(f"--resume {path.parent}: no checkpoint.pt in that folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupt, not a checkpoint: torch raises several types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fail(f"{path} cannot be read ({reason}); checkpoints are written atomically, so a damaged one "
             f"comes from outside (an interrupted copy, a full disk)")


def _resumed_args(cls, args, given: dict):
    """The run's own options (from its checkpoint), plus the per-command ones and the allowed
    changes from this command line. Any other difference is an error naming each option."""
    saved = read_checkpoint(Path(args.resume) / "checkpoint.pt", mmap=True).get("args", {})
    names = {f.name for f in fields(cls)}
    base = {**dataclasses.asdict(cls()), **{k: v for k, v in saved.items() if k in names}}
    for name in _PER_COMMAND:
        base[name] = getattr(args, name)
    refused, changed = [], {}
    for name, value in given.items():
        if name in _PER_COMMAND or value == base[name]:
            continue
        if name in RESUME_MAY_CHANGE and not (name == "epochs" and value < base[name]):
            changed[name] = [base[name], value]
            base[name] = value
        else:
            refused.append(f"{_flag(name)} {value} (the run has {base[name]})")
    if refused:
        fail(f"--resume {args.resume} continues that run with its own options, and these would change it: "
             f"{'; '.join(refused)}. Drop them, or start a new run with --out "
             f"(a resume may change {', '.join(_flag(n) for n in RESUME_MAY_CHANGE)}; --epochs only upward)")
    resumed = cls(**base)
    resumed.changed_on_resume = changed  # not a field: Run writes it into config.json's "resumes"
    return resumed


# ---------------------------------------------------------------------------
# Errors: bad input is one line on stderr and exit code 2, never a traceback
# ---------------------------------------------------------------------------
class RunError(Exception):
    """Bad input (exit code 2), or a run that cannot go on (a diverged loss: exit code 1).

    main(argv) raises it for a Python caller to catch; on the command line, cli() prints
    the message as one line on stderr and exits with the code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run after it saved what was worth saving (exit code
    128 + signal). A KeyboardInterrupt, not an Exception, so a sweep's `except Exception`
    does not swallow it and go on to the next run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


WRITE_FAILED = 3  # exit code: a file of the run could not be written (a full disk, a quota, a read-only folder)


def fail(message: str, code: int = 2):
    raise RunError(message, code)


class WriteFailed(RunError):
    """A file could not be written: its name, the error, the free space left; exit code 3."""

    def __init__(self, path: Path, error: Exception):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MB free there"
        except OSError:
            free = "free space unknown"
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0][:200]
        super().__init__(f"could not write {path}: {why} ({free})", WRITE_FAILED)


_WARNED: set = set()


def warn_once(key: str, message: str):
    """One warning line for `key` in this process, however often it comes up."""
    if key not in _WARNED and os.environ.get("RANK", "0") == "0":
        _WARNED.add(key)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _leave(signum, frame):
    raise Stopped(signum)


def cli(main):
    """Run a script's main() as a command: a RunError is one line on stderr and its exit
    code; a stop by SIGINT/SIGTERM exits 128 + signal; neither prints a traceback."""
    signal.signal(signal.SIGTERM, _leave)  # outside a Run (parsing, importing): leave at once
    try:
        main()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun, leave without the interpreter's teardown: the work is done, the
            # files are closed and the process group destroyed, yet gloo's threads can still
            # abort the process while Python finalises ("terminate called without an active
            # exception", exit -6; seen once in this project's CI, cf. pytorch/pytorch#179291),
            # and torchrun would then report the finished run as failed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.code)
    except Stopped as e:
        raise SystemExit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C outside a Run
        raise SystemExit(128 + signal.SIGINT)


def run_main(train, cls, argv=None, doc: str | None = None):
    """parse_args, then train(args). Whatever happens, the Run that train opened is closed:
    signal handlers restored, log file closed, process group destroyed."""
    args = parse_args(cls, argv, doc)
    try:
        return train(args)
    finally:
        for run in list(_OPEN_RUNS):
            run.close()


def check_image_size(args, minimum: int, why: str):
    if args.image_size < minimum:
        fail(f"--image-size {args.image_size} is too small: {why} needs at least {minimum} px")


# ---------------------------------------------------------------------------
# Colour space: sRGB <-> CIE Lab (D65), batched and differentiable
# ---------------------------------------------------------------------------
# sRGB (IEC 61966-2-1) primaries to CIE XYZ, D65 white point.
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_D65 = torch.tensor([0.95047, 1.0, 1.08883])
_DELTA = 6.0 / 29.0


def select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where(cond, a, b) for finite float a and b (broadcast together), as a lerp from b
    to a by 0 or 1: exactly the same values (b + 0 (a - b) = b, a - 0 (a - b) = a), and
    several times faster on a CPU, where torch.where's kernel is slow (0.5 ms against
    0.06 ms on 256 images of 32 px, 2 cores). The augmentations and colour conversions,
    which run on every image of every step, use it."""
    return torch.lerp(b, a, cond.to(a.dtype if a.is_floating_point() else torch.get_default_dtype()))


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channel dimension of (N, 3, H, W)."""
    return torch.einsum("ij,njhw->nihw", m.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) -> Lab with L in [0, 100] (CIE 1976, D65)."""
    xyz = _mix(_RGB_TO_XYZ, _linear_rgb(rgb)) / _D65.to(rgb).view(1, 3, 1, 1)
    f = _lab_f(xyz)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lightness(rgb: torch.Tensor) -> torch.Tensor:
    """rgb_to_lab's L alone, (N, 1, H, W): from Y only (D65's Y is 1), a third of the work,
    for a method that needs L at full size and ab at fewer pixels (colorization)."""
    return 116 * _lab_f(_mix(_RGB_TO_XYZ[1:2], _linear_rgb(rgb))) - 16


def _linear_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer function undone; the clamp keeps pow's gradient finite at 0."""
    rgb = rgb.clamp(0, 1)
    return select(rgb > 0.04045, ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    """CIE Lab's f: the cube root, linear near 0."""
    return select(t > _DELTA ** 3, t.clamp(min=_DELTA ** 3) ** (1 / 3), t / (3 * _DELTA ** 2) + 4 / 29)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab (N, 3, H, W) -> sRGB, clamped to [0, 1] (out-of-gamut colours are clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = select(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29)) * _D65.to(lab).view(1, 3, 1, 1)
    linear = _mix(_XYZ_TO_RGB, xyz)
    srgb = select(linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return srgb.clamp(0, 1)


# ---------------------------------------------------------------------------
# Real data: CIFAR-10/100, STL-10, image folders, DAVIS videos
# ---------------------------------------------------------------------------
class TensorImages(Dataset):
    """uint8 images (N, 3, S, S) held in memory, with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def _resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and centre-crop, uint8 in and out."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[..., top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def _resize_in_chunks(images: torch.Tensor, size: int, chunk: int = 2000) -> torch.Tensor:
    return torch.cat([_resize_square(images[i:i + chunk], size) for i in range(0, len(images), chunk)])


def read_image(path) -> torch.Tensor:
    """One image file as RGB uint8 (3, H, W). PIL reads the header first, so its
    decompression-bomb guard refuses files of more than about 179 M pixels before any
    pixel is decoded; JPEG and PNG are then decoded by the fastest decoder at hand
    (jpeg_decoder(): TorchCodec when installed, else torchvision.io; benchmarks/
    data_pipeline.py measures them), other formats by PIL. Raises what they raise for a
    file they cannot decode (OSError, DecompressionBombError, RuntimeError, ...)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    with Image.open(path) as im:
        if im.format not in ("JPEG", "PNG"):
            return pil_to_tensor(im.convert("RGB"))
    x = DECODERS[jpeg_decoder()](path)
    if x.dtype != torch.uint8:  # 16-bit PNG
        x = (x.float() / 257).round().to(torch.uint8)
    return x


def _decode_torchcodec(path) -> torch.Tensor:
    from torchcodec.decoders import decode_image
    return decode_image(str(path), mode="RGB")


def _decode_torchvision(path) -> torch.Tensor:
    import torchvision.io as tvio
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec: said once
        warnings.simplefilter("ignore", DeprecationWarning)
        return tvio.decode_image(tvio.read_file(str(path)), mode=tvio.ImageReadMode.RGB)


def _decode_pil(path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB"))


DECODERS = {"torchcodec": _decode_torchcodec, "torchvision": _decode_torchvision, "pil": _decode_pil}


@functools.lru_cache(maxsize=None)
def jpeg_decoder() -> str:
    """Which decoder reads JPEG and PNG files, chosen once: TorchCodec when it is installed
    and works (torchvision 0.29 deprecates its own decoders in its favour), else
    torchvision.io while it has them, else PIL. SSL_DECODER=torchcodec|torchvision|pil
    forces one (the tests run each)."""
    forced = os.environ.get("SSL_DECODER", "")
    if forced:
        if forced not in DECODERS:
            fail(f"SSL_DECODER must be one of {', '.join(DECODERS)}, not {forced}")
        return forced
    try:
        from torchcodec.decoders import decode_image  # noqa: F401
        return "torchcodec"
    except Exception:  # not installed, or its libraries do not load here
        pass
    try:
        import torchvision.io as tvio
        return "torchvision" if hasattr(tvio, "decode_image") else "pil"
    except ImportError:
        return "pil"


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) with its shorter side resized to `size`, aspect kept (bilinear,
    antialiased, torchvision's uint8 kernel: about 8x faster than resizing in float)."""
    if min(x.shape[-2:]) == size:
        return x
    from torchvision.transforms.v2.functional import resize
    return resize(x, [size], antialias=True)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = round((h - size) / 2), round((w - size) / 2)
    return x[..., top:top + size, left:left + size]


def sizes_for(shorter: int, image_size: int, load_size: int) -> tuple[int, int]:
    """(shorter side kept for training, shorter side resized to for evaluation) of an image
    whose shorter side is `shorter`. Evaluation: torchvision's ImageNet recipe, resize to
    image_size / 0.875 then centre-crop image_size (256 -> 224); training keeps the whole
    image at load_size (0: the same image_size / 0.875). Neither upscales an image beyond
    its own size only to crop it again; an image smaller than image_size is upscaled to it."""
    eval_side = round(image_size / 0.875)
    keep = load_size or eval_side
    return max(image_size, min(keep, shorter)), max(image_size, min(eval_side, shorter))


@dataclass
class WholeImages:
    """A batch of whole images of different sizes: pixels (N, 3, H, W), each image in the
    top left corner (its last row and column repeated beside it), and sizes (N, 2), each
    image's (h, w)."""

    pixels: torch.Tensor
    sizes: torch.Tensor

    def __len__(self):
        return len(self.pixels)

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this
        return WholeImages(self.pixels.pin_memory(), self.sizes.pin_memory())


def collate_whole(batch):
    """Collate (image, label) pairs of whole images of any size into WholeImages (padded to
    the largest). Each method crops them its own way; Run.to_device takes a batch of
    --image-size squares as a plain batch."""
    images, labels = zip(*batch)
    labels = torch.as_tensor(labels)
    h, w = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    pixels = torch.empty(len(images), 3, h, w, dtype=images[0].dtype)
    for i, x in enumerate(images):
        xh, xw = x.shape[-2:]
        # The image, then its last column and row repeated: crops sample its edge, not zeros.
        pixels[i, :, :xh, :xw] = x
        pixels[i, :, :xh, xw:] = x[:, :, -1:]
        pixels[i, :, xh:, :] = pixels[i, :, xh - 1:xh, :]
    return WholeImages(pixels, torch.tensor([tuple(x.shape[-2:]) for x in images])), labels


class RaggedImages(Dataset):
    """uint8 images of different sizes held in memory (one flat buffer), with labels;
    item i is (3, h_i, w_i). Its loader collates with collate_whole."""

    whole_images = True  # batches of whole images of different sizes: collate_whole

    def __init__(self, flat: torch.Tensor, shapes: torch.Tensor, labels: torch.Tensor):
        self.flat, self.shapes, self.labels = flat, shapes, labels
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), (3 * shapes[:, 0] * shapes[:, 1]).cumsum(0)])

    @classmethod
    def of(cls, images: list[torch.Tensor], labels: list[int]):
        flat = torch.cat([x.flatten() for x in images]) if images else torch.empty(0, dtype=torch.uint8)
        return cls(flat, torch.tensor([tuple(x.shape[-2:]) for x in images], dtype=torch.long).view(-1, 2),
                   torch.tensor(labels, dtype=torch.long))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        h, w = self.shapes[i].tolist()
        return self.flat[self.offsets[i]:self.offsets[i + 1]].view(3, h, w), self.labels[i]

    def state(self) -> dict:
        return {"flat": self.flat, "shapes": self.shapes, "labels": self.labels}


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


class FolderImages(Dataset):
    """Images under class subfolders (ImageFolder layout), decoded on access, for folders
    too large to keep in memory. view "train": the whole image at the training load size
    (collated with collate_whole); "eval": the evaluation square (resize, centre crop).
    Every file's header was read when the folder was (check_files); a file that fails here
    is damaged past its header and comes back as a black image with a warning, never as a
    copy of another image."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, load_size: int = 0, view: str = "eval"):
        self.samples, self.image_size, self.load_size, self.view = samples, image_size, load_size, view
        self.whole_images = view == "train"

    def __len__(self):
        return len(self.samples)

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        return resize_shorter(x, sizes_for(min(x.shape[-2:]), self.image_size, self.load_size)[0])

    def _square(self, x: torch.Tensor) -> torch.Tensor:
        side = sizes_for(min(x.shape[-2:]), self.image_size, self.load_size)[1]
        return centre_crop(resize_shorter(x, side), self.image_size)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            x = read_image(path)
            x = self._whole(x) if self.view == "train" else self._square(x)
        except Exception as e:  # any decoding failure of this one file
            warnings.warn(f"{path} cannot be decoded ({_why(e)}); a black image stands in for it")
            x = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return x, torch.tensor(label)


class _Decoded(FolderImages):
    """Decoding of one file: (whole image at the load size or None, evaluation square or
    None, label, its shorter side before resizing, what went wrong or "")."""

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            x = read_image(path)
            whole, square = (self._whole(x) if self.view == "train" else None), self._square(x)
        except Exception as e:  # reported once, by the caller, with the count
            return None, None, label, 0, f"{path} ({_why(e)})"
        return whole, square, label, min(x.shape[-2:]), ""


def _as_list(batch):
    return batch


def decode_to_memory(samples: list[tuple[str, int]], image_size: int, load_size: int, workers: int,
                     whole: bool = True) -> dict:
    """Decode every file once (in `workers` processes) and keep uint8 images: the
    evaluation squares (N, 3, S, S) and, with `whole`, the whole images at the load size.
    Returns a dict of tensors and lists (what torch.save can share between processes)."""
    view = "train" if whole else "eval"
    wholes, squares, labels, problems, small = [], [], [], [], 0
    for batch in DataLoader(_Decoded(samples, image_size, load_size, view), batch_size=64, num_workers=workers,
                            collate_fn=_as_list):
        for x, square, label, side, problem in batch:
            if problem:
                problems.append(problem)
                continue
            # Copies: a tensor received from a worker keeps a file descriptor open while it
            # lives (torch's file_descriptor sharing), and 50,000 kept images would run past
            # the process's limit ("received 0 items of ancdata").
            if whole:
                wholes.append(x.clone() if workers else x)
            squares.append(square.clone() if workers else square)
            labels.append(label)
            small += side < image_size
    out = {"squares": torch.stack(squares) if squares else torch.empty(0, 3, image_size, image_size,
                                                                        dtype=torch.uint8),
           "labels": torch.tensor(labels, dtype=torch.long), "problems": problems, "small": small}
    if whole and all(x.shape[-2:] == (image_size, image_size) for x in wholes):
        out["whole"] = None  # every image already is the training square: nothing to crop from
    elif whole:
        out["whole"] = RaggedImages.of(wholes, labels).state()
    return out


def _header(path: str) -> tuple[int, str]:
    """(shorter side, problem) from the file's header, without decoding its pixels."""
    from PIL import Image
    try:
        with Image.open(path) as im:  # also PIL's decompression-bomb guard
            return min(im.size), ""
    except Exception as e:
        return 0, f"{path} ({_why(e)})"


def check_files(samples: list[tuple[str, int]], size: int):
    """Read every file's header (threads: it is all file opening). Returns (the samples
    whose header reads, problems: one line per other file, number smaller than `size`)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as pool:
        headers = list(pool.map(_header, [path for path, _ in samples]))
    kept = [s for s, (_, problem) in zip(samples, headers) if not problem]
    return kept, [p for _, p in headers if p], sum(0 < side < size for side, _ in headers)


def _say(message: str):
    """Print on the first process only (data is loaded before a Run's print is at hand)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
TEST_SPLITS = ("val", "test", "valid", "validation")  # the first one beside train/ is the test split


def _scan_folder(root: Path):
    """(class names, [(path, class index)]) of root/<class>/**/<image>; hidden folders skipped.
    A class folder without images is refused, as torchvision's ImageFolder refuses it: it
    would be a class the evaluation can never see."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples, empty = [], []
    for k, name in enumerate(classes):
        found = [(str(p), k) for p in sorted((root / name).rglob("*"))
                 if p.suffix.lower() in IMAGE_EXTENSIONS
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)]  # not root's own "../"
        samples += found
        if not found:
            empty.append(name)
    if empty and len(empty) < len(classes):
        fail(f"{root}: {len(empty)} class folder(s) without images: {', '.join(empty[:5])}"
             f"{' ...' if len(empty) > 5 else ''} (torchvision's ImageFolder refuses them too); remove them or add "
             f"images")
    return classes, samples


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())


def folder_splits(root: Path):
    """The layout of an image folder: (classes, train samples, test samples, one-line summary).

    root/train/<class>/ with root/val/<class>/ (or test/, valid/, validation/): those two
    splits; otherwise root/<class>/, of which a fixed 10% is the test split. A top-level
    folder named like a split is never taken for a class."""
    if not root.is_dir():
        fail(f"--data-dir {root} does not exist or is not a folder")
    top = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_name = {d.lower(): d for d in top}
    splits = [d for d in top if d.lower() in SPLIT_NAMES]
    train_dir = by_name.get("train")
    test_dir = next((by_name[s] for s in TEST_SPLITS if s in by_name), None)
    if train_dir and test_dir:
        for split in (train_dir, test_dir):
            if _has_images(root / split) and not any(p.is_dir() for p in (root / split).iterdir()):
                fail(f"{root / split} holds images but no class folders; both splits need the "
                     f"<split>/<class>/<image> layout (ImageNet's raw val/ is flat: sort it into class folders)")
        classes, train = _scan_folder(root / train_dir)
        test_classes, test = _scan_folder(root / test_dir)
        index = {c: k for k, c in enumerate(classes)}
        if not set(test_classes) <= set(index):
            fail(f"{root / test_dir} has classes that {root / train_dir} lacks: "
                 f"{sorted(set(test_classes) - set(index))[:5]}")
        test = [(p, index[test_classes[k]]) for p, k in test]
        where = (f"({train_dir}/)", f"({test_dir}/" + (f", {len(test_classes)} of the classes" if
                                                        len(test_classes) < len(classes) else "") + ")")
    elif splits:
        hint = (f"a {', '.join(s + '/' for s in splits)} folder but no "
                f"{'val/ or test/' if train_dir else 'train/'} beside it")
        fail(f"{root} has {hint}; a split folder would become a class. Use train/<class>/ with val/<class>/ "
             f"(or test/<class>/), or point --data-dir at one split's folder to split it 90/10")
    else:
        classes, samples = _scan_folder(root)
        # One folder: a fixed 10% of it (chosen by a seed, not by --seed) is the test split.
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
        n_test = max(1, len(samples) // 10) if len(samples) > 1 else 0
        test, train = [samples[i] for i in order[:n_test]], [samples[i] for i in order[n_test:]]
        where = ("(90% of the folder)", "(a fixed 10% of it)")
    if not train:
        fail(f"no images found in {root} (expected <class>/<image> files, or train/<class>/ and val/<class>/)")
    if not test:
        fail(f"no test images found in {root}")
    summary = (f"data: {len(classes)} classes, {len(train)} training images {where[0]}, "
               f"{len(test)} test images {where[1]}")
    return classes, train, test, summary


@dataclass
class ImageData:
    pretrain: Dataset  # what the pretext task trains on (no labels used)
    train: Dataset  # labelled split the probes are fitted on
    test: Dataset  # labelled split the probes are scored on
    classes: tuple

    @property
    def num_classes(self):
        return len(self.classes)


_CACHE_BYTES = 2 << 30  # image folders smaller than this once decoded are kept in memory


def load_image_data(args) -> ImageData:
    """The dataset named by args.dataset, as uint8 images of args.image_size."""
    size = args.image_size
    if args.dataset == "shapes":
        if not 32 <= size <= 128:
            fail(f"the built-in shapes come in 32 to 128 px, not {size}")
        train, test = (TensorImages(*split) for split in _builtin_images(size))
        return ImageData(train, train, test, _builtin_data().SHAPE_CLASSES)
    if args.dataset == "folder":
        return _load_folder(args)
    return _load_torchvision(args)


@functools.lru_cache(maxsize=2)
def _builtin_images(size: int):
    """The built-in training (10,000) and test (2,000) images and labels at `size` px. Fixed
    data seeds, independent of --seed: every run sees the same images. Kept for the next
    run in the same process (a sweep, the tests): rendering takes seconds."""
    shapes = _builtin_data()
    return shapes.make_shapes(10_000, size, seed=0), shapes.make_shapes(2_000, size, seed=1)


def load_side(args) -> int:
    """The shorter side whole training photos are kept at, for the method to crop from:
    --load-size, else the method's own LOAD_SCALE x --image-size (its paper's load-then-crop
    geometry, a ClassVar of its Args), else --image-size / 0.875 (256 for 224 crops)."""
    return args.load_size or round(args.image_size * getattr(args, "LOAD_SCALE", 1 / 0.875))


def _load_folder(args) -> ImageData:
    root = Path(args.data_dir)
    classes, train, test, summary = folder_splits(root)
    _say(summary)
    size, total = args.image_size, len(train) + len(test)
    keep = load_side(args)
    # Kept in memory: the whole training images at the load size (4:3 assumed for the
    # estimate) and the evaluation squares of both splits.
    in_memory = len(train) * 3 * keep * keep * 4 // 3 + total * 3 * size ** 2 <= _CACHE_BYTES
    if not in_memory:
        _say(f"checking {total} image files (too many to keep in memory: decoded as they are used) ...")
        (train, bad_train, small_train), (test, bad_test, small_test) = (check_files(s, size) for s in (train, test))
        problems, small = bad_train + bad_test, small_train + small_test
        for split, kept, bad in (("training", train, bad_train), ("test", test, bad_test)):
            if not kept:
                fail(f"none of the {len(bad)} {split} image files in {root} can be read (first: {bad[0]})")
        sets = (FolderImages(train, size, keep, "train"), FolderImages(train, size),
                FolderImages(test, size))
    else:
        _say(f"decoding {total} image files from {root} into memory ...")
        workers = min(args.workers, os.cpu_count() or 1)
        key = f"{root.resolve()}|{size}|{keep}|{total}"
        parts = [_once_per_machine(lambda: decode_to_memory(s, size, keep, workers, whole), f"{key}|{i}")
                 for i, (s, whole) in enumerate(((train, True), (test, False)))]
        problems, small = parts[0]["problems"] + parts[1]["problems"], parts[0]["small"] + parts[1]["small"]
        for split, part, samples in (("training", parts[0], train), ("test", parts[1], test)):
            if len(part["labels"]) == 0:
                fail(f"none of the {len(samples)} {split} image files in {root} can be read "
                     f"(first: {part['problems'][0]})")
        train_eval, test_eval = (TensorImages(p["squares"], p["labels"]) for p in parts)
        pretrain = RaggedImages(**parts[0]["whole"]) if parts[0]["whole"] else train_eval
        sets = (pretrain, train_eval, test_eval)
    if problems:  # skipped, so the dataset shrinks; never replaced by another image
        _say(f"skipped {len(problems)} of {total} image files that cannot be read; the first: {problems[0]}")
    if small:
        _say(f"{small} of {total - len(problems)} images are smaller than --image-size {size} on their shorter "
             f"side and are upscaled")
    return ImageData(*sets, tuple(classes))


def _once_per_machine(make, key: str):
    """make() on the first process of each machine; under torchrun the other processes
    map its result from a file instead of decoding a copy of their own, so the decoded
    images take memory once per machine, not once per process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return make()
    import hashlib
    import socket
    import tempfile
    tag = hashlib.sha1(f"{key}|{os.environ.get('MASTER_PORT')}|{socket.gethostname()}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"ssl-data-{tag}.pt"
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    try:
        if first:
            _write_atomic(path, lambda f: torch.save(make(), f))
    finally:  # also when make() fails, so that the others are not left waiting
        dist.barrier()
    if not path.is_file():
        fail("the first process of this machine could not decode the data (see its error above)")
    result = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    dist.barrier()
    if first:
        path.unlink()  # the mappings stay valid; the file goes when the last process ends
    return result


def _load_torchvision(args) -> ImageData:
    import torchvision.datasets as tvd
    name, root = args.dataset, args.data_dir
    first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if not first:
        dist.barrier()  # under torchrun the first process downloads alone; the others then read its files
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            parts = [cls(root, train=train, download=args.download) for train in (True, False)]
            tensors = [(torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets)) for p in parts]
            classes = parts[0].classes
        else:  # stl10: pretrain on the 100k unlabelled images plus the 5k labelled ones
            parts = [tvd.STL10(root, split=s, download=args.download) for s in ("train", "test", "unlabeled")]
            tensors = [(torch.from_numpy(p.data), torch.from_numpy(p.labels).long()) for p in parts]
            classes = parts[0].classes
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        fail(f"{name} not found in {root} ({e}); pass --download, or --data-dir pointing at it")
    except OSError as e:  # no network, disk full, ...
        fail(f"could not download {name} into {root}: {e}")
    finally:
        if first and dist.is_available() and dist.is_initialized():
            dist.barrier()  # also after a failure: the others then fail with their own one line
    sets = [TensorImages(_resize_in_chunks(x, args.image_size), y) for x, y in tensors]
    pretrain = sets[0]
    if name == "stl10":
        pretrain = torch.utils.data.ConcatDataset([sets[2], sets[0]])
    return ImageData(pretrain, sets[0], sets[1], tuple(classes))


def read_mask(path) -> torch.Tensor:
    """A DAVIS annotation as object ids (H, W) uint8: 0 background, 1.. objects.

    DAVIS-2016 stores one object as a {0, 255} greyscale PNG; DAVIS-2017 stores a
    palette PNG whose indices are the object ids. Both come out the same way."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    with Image.open(path) as im:
        if im.mode == "P":
            return pil_to_tensor(im)[0]
        grey = pil_to_tensor(im.convert("L"))[0]
        return (grey > 127).to(torch.uint8)


def load_davis(root, size: int | None = None, videos: list[str] | None = None, resolution: str = "480p"):
    """DAVIS-layout videos: {name: (frames (T, 3, H, W) uint8, masks uint8 or None)}.

    masks: (T, H, W) when every frame is annotated (DAVIS 2016/2017 train and val);
    (1, H, W) when only the first frame is (the DAVIS-2017 test-dev layout: enough to
    propagate, not to score); None without annotations. With `size`, frames and masks
    are resized so the shorter side is `size` (masks with nearest neighbour, so ids stay ids)."""
    root = Path(root)
    frame_root = root / "JPEGImages" / resolution
    if not frame_root.is_dir():
        fail(f"{root} is not a DAVIS folder (no JPEGImages/{resolution}/<video>/ inside)")
    names = videos or sorted(d.name for d in frame_root.iterdir() if d.is_dir())
    out = {}
    for name in names:
        files = sorted(p for p in (frame_root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            fail(f"no frames in {frame_root / name}")
        frames = torch.stack(_same_size([_read_or_fail(read_image, p) for p in files], frame_root / name))
        mask_dir = root / "Annotations" / resolution / name
        paths = [mask_dir / (p.stem + ".png") for p in files]
        masks = None
        if all(q.is_file() for q in paths):
            masks = torch.stack(_same_size([_read_or_fail(read_mask, q) for q in paths], mask_dir))
        elif paths[0].is_file():
            masks = _read_or_fail(read_mask, paths[0])[None]
        if masks is not None and masks.shape[-2:] != frames.shape[-2:]:
            fail(f"the masks in {mask_dir} are {tuple(masks.shape[-2:])} px, the frames {tuple(frames.shape[-2:])}")
        if size is not None:
            h, w = frames.shape[-2:]
            shape = (round(h * size / min(h, w)), round(w * size / min(h, w)))
            frames = F.interpolate(frames.float(), size=shape, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
            if masks is not None:
                masks = F.interpolate(masks[:, None].float(), size=shape, mode="nearest")[:, 0].to(torch.uint8)
        out[name] = (frames, masks)
    return out


def _read_or_fail(read, path):
    try:
        return read(path)
    except Exception as e:  # a video with a broken frame cannot be used as a video
        fail(f"cannot read {path} ({_why(e)})")


def _same_size(images: list[torch.Tensor], where: Path) -> list[torch.Tensor]:
    sizes = sorted({tuple(x.shape[-2:]) for x in images})
    if len(sizes) > 1:
        fail(f"the images in {where} differ in size ({', '.join(f'{h}x{w}' for h, w in sizes[:3])}); "
             f"a video's frames must all have one size")
    return images


# ---------------------------------------------------------------------------
# Augmentation and input normalisation (batched, on the training device)
# ---------------------------------------------------------------------------
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as torchvision models expect


def _hsv_to_rgb(h, s, v):
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    return v.unsqueeze(-1) - v.unsqueeze(-1) * s.unsqueeze(-1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


class Normalize(nn.Module):
    """(x - mean) / std per channel; the first layer of every encoder that is evaluated."""

    def __init__(self, mean=MEAN, std=STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def to_float(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(255)


def random_crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation, batched: reflect-pad, random crop back, random h-flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
    rows = oy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = ox + torch.arange(w, device=x.device).view(1, 1, w)
    flip = torch.rand(n, 1, 1, device=x.device) < 0.5
    cols = torch.where(flip, cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_crop(x: WholeImages, size: int, flip: bool = False) -> torch.Tensor:
    """A `size` x `size` window of each whole image, at a uniformly random place inside the
    image's own size, with a random horizontal flip if `flip`: torchvision's RandomCrop
    (and RandomHorizontalFlip) on images kept at the load size, batched. Pixels are taken
    as they are (no resampling); float (N, 3, size, size) in [0, 1]."""
    pixels, dev = x.pixels, x.pixels.device
    hw = x.sizes.to(dev)
    if bool((hw < size).any()):
        raise ValueError(f"an image of {tuple(hw.min(0).values.tolist())} px is smaller than the {size} px crop")
    n = len(pixels)
    top = (torch.rand(n, device=dev) * (hw[:, 0] - size + 1)).long().view(n, 1, 1)
    left = (torch.rand(n, device=dev) * (hw[:, 1] - size + 1)).long().view(n, 1, 1)
    r = torch.arange(size, device=dev)
    cols = r.view(1, 1, size).expand(n, 1, size)
    if flip:
        cols = torch.where(torch.rand(n, 1, 1, device=dev) < 0.5, cols.flip(-1), cols)
    batch = torch.arange(n, device=dev).view(n, 1, 1)
    out = pixels.permute(0, 2, 3, 1)[batch, top + r.view(1, size, 1), left + cols].permute(0, 3, 1, 2)
    return out.float().div_(255) if out.dtype == torch.uint8 else out.contiguous()


def random_resized_crop(x, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                        size: int | None = None) -> torch.Tensor:
    """Per-image random crop of `scale` of the area and aspect `ratio`, resized to the
    output size (bilinear), and a random horizontal flip: torchvision's RandomResizedCrop
    and RandomHorizontalFlip, batched, its crops drawn as it draws them (crop_sides).

    x: (N, C, H, W) float, cropped back to its own size; or WholeImages (uint8 or float
    pixels), each crop a share of its own image's area, anywhere in it, resized to
    `size` x `size`, float in [0, 1]."""
    whole = isinstance(x, WholeImages)
    pixels = x.pixels if whole else x
    n, c, h, w = pixels.shape
    dev = pixels.device
    hw = x.sizes if whole else torch.tensor([[h, w]]).expand(n, 2)  # each image's own size
    cw, ch, drawn = crop_sides(n, scale, ratio, hw, dev)  # fractions of each image's w, h
    # The crop's corner at a whole pixel, as torchvision's (randint over the places it fits),
    # given as its centre in [-1, 1]; no draw fitted: the centre crop.
    side_h, side_w = hw.to(dev, torch.float32).unbind(1)
    pw, ph = cw * side_w, ch * side_h  # whole pixels
    cx = ((torch.rand(n, device=dev) * (side_w - pw + 1)).floor() + pw / 2) / side_w * 2 - 1
    cy = ((torch.rand(n, device=dev) * (side_h - ph + 1)).floor() + ph / 2) / side_h * 2 - 1
    cx, cy = cx * drawn, cy * drawn
    sign = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    if whole:
        return crop_whole(x, cw, ch, cx, cy, sign, size)
    zero = torch.zeros(n, device=dev)
    theta = torch.stack([torch.stack([cw * sign, zero, cx], 1), torch.stack([zero, ch, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def crop_sides(n: int, scale, ratio, hw: torch.Tensor, device, tries: int = 10):
    """(cw, ch, drawn): n crops as fractions of their images' width and height, drawn as
    torchvision's RandomResizedCrop.get_params draws them: up to `tries` draws of an area
    share (uniform in `scale`) and an aspect w / h (log-uniform in `ratio`), the crop's
    sides rounded to whole pixels; the first that fits inside the image is kept. A draw
    that does not fit is drawn again, not shrunk to fit: shrinking would keep more large
    crops (at 32 px, scale 0.08-1, a mean crop of 53% of the image instead of 49%). An
    image with no fitting draw (drawn False) gets the whole image cut to the nearest
    aspect in `ratio`, as there (centred by the caller). hw: (n, 2) each image's height
    and width in px. All tries are drawn at once."""
    area = torch.empty(n, tries, device=device).uniform_(*scale)
    aspect = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    h, w = hw[:, :1].to(device, torch.float32), hw[:, 1:].to(device, torch.float32)
    pw, ph = (area * aspect * h * w).sqrt().round(), (area / aspect * h * w).sqrt().round()  # px
    fits = (pw > 0) & (pw <= w) & (ph > 0) & (ph <= h)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 where none does)
    drawn = fits.any(1)
    own = (w / h)[:, 0]  # each image's own aspect
    fw = torch.where(own > ratio[1], (h[:, 0] * ratio[1]).round() / w[:, 0], 1.0)  # wider than allowed: narrower
    fh = torch.where(own < ratio[0], (w[:, 0] / ratio[0]).round() / h[:, 0], 1.0)  # taller than allowed: lower
    cw, ch = pw.gather(1, first)[:, 0] / w[:, 0], ph.gather(1, first)[:, 0] / h[:, 0]
    return torch.where(drawn, cw, fw), torch.where(drawn, ch, fh), drawn


def centre_squares(x: WholeImages, size: int) -> torch.Tensor:
    """The largest centred square of each whole image, resized to `size` (no randomness)."""
    hw = x.sizes.to(x.pixels.device, torch.float32)
    side = hw.min(1).values
    zero, one = torch.zeros(len(x), device=hw.device), torch.ones(len(x), device=hw.device)
    return crop_whole(x, side / hw[:, 1], side / hw[:, 0], zero, zero, one, size)


def crop_whole(x: WholeImages, cw, ch, cx, cy, sign, size: int, batched: bool | None = None) -> torch.Tensor:
    """Crops of whole images, float (N, 3, size, size) in [0, 1]: widths and heights as
    fractions of each image (cw, ch), centres in its own [-1, 1] coordinates (cx, cy),
    mirrored where sign < 0. batched (default: on GPUs): one bilinear grid_sample for the
    batch. Otherwise (the CPU default) each crop is cut from the uint8 image, its box
    rounded to whole pixels as torchvision's RandomResizedCrop does, and resized with the
    antialiased uint8 kernel torchvision uses: several times faster on a CPU than sampling
    the float batch (benchmarks/data_pipeline.py)."""
    pixels = x.pixels
    n, c, h, w = pixels.shape
    hw = x.sizes.to(pixels.device, torch.float32)
    if batched if batched is not None else pixels.device.type != "cpu":
        p = pixels.float().div(255) if pixels.dtype == torch.uint8 else pixels
        fx, fy = hw[:, 1] / w, hw[:, 0] / h  # image i fills [-1, 2 w_i / W - 1] of the padded batch
        zero = torch.zeros(n, device=pixels.device)
        theta = torch.stack([torch.stack([cw * fx * sign, zero, (cx + 1) * fx - 1], 1),
                             torch.stack([zero, ch * fy, (cy + 1) * fy - 1], 1)], 1)
        grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
        # collate_whole repeats each image's last row and column beside it, so the border
        # samples see the image's edge, not the padding.
        return F.grid_sample(p, grid, mode="bilinear", padding_mode="border", align_corners=False)
    width, height = (cw * hw[:, 1]).round().clamp(min=1), (ch * hw[:, 0]).round().clamp(min=1)
    left = ((cx + 1) / 2 * hw[:, 1] - width / 2).round().clamp(min=0).minimum(hw[:, 1] - width)
    top = ((cy + 1) / 2 * hw[:, 0] - height / 2).round().clamp(min=0).minimum(hw[:, 0] - height)
    boxes = torch.stack([top, left, height, width], 1).long().tolist()
    out = torch.cat([F.interpolate(pixels[i:i + 1, :, t:t + bh, l:l + bw], size=(size, size), mode="bilinear",
                                   antialias=True) for i, (t, l, bh, bw) in enumerate(boxes)])
    out = torch.where((sign < 0).view(n, 1, 1, 1), out.flip(-1), out)
    return out.float().div_(255) if out.dtype == torch.uint8 else out


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (N, 1, H, W) (torchvision's rgb_to_grayscale rounds red's 0.299 to 0.2989),
    as one product and two in-place multiply-adds over the channel planes."""
    r, g, b = x.unbind(1)
    return (r * 0.299).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB) without
    building h, s and v: a hue shift keeps each pixel's largest channel v and smallest
    v - delta, and moves the middle one. x: (N, 3, H, W) in [0, 1], shift: (N, 1, 1).

    With H = 6 h (+ 6 shift) taken mod 6 once, torchvision's channel c is
    v - delta clamp(2 - |H - centre_c|, 0, 1), centres 3 (red), 5 (green), 1 (blue), the
    distance taken around the circle of 6; as delta >= 0 that is
    clamp(v - 2 delta + delta |H - centre_c|, v - delta, v). H of the unshifted pixel:
    (g - b) / delta if red is largest, (b - r) / delta + 2 if green, (r - g) / delta + 4 if
    blue, a tie going to the first (argmax's order, as torchvision). Grey pixels
    (delta = 0) come back as they were, whatever H. About 1.4x faster on a CPU than the
    HSV round trip written out (256 images of 32 px); equal to torchvision's to 1e-4
    (tests/test_common.py)."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    delta = v - low
    # 0/1 masks made as floats (a bool result and its conversion cost several times more
    # on a CPU), then lerp between the cases: lerp(a, b, 0) = a, lerp(a, b, 1) = b exactly.
    red, green = torch.eq(r, v, out=torch.empty_like(v)), torch.eq(g, v, out=torch.empty_like(v))
    h = torch.lerp(torch.lerp(r - g, b - r, green), g - b, red).div_(delta.clamp(min=1e-8))
    h.add_(torch.lerp(4.0 - 2.0 * green, torch.zeros(()), red)).add_(6 * shift)  # + 4 (blue), 2 (green), 0 (red)
    h.sub_(torch.floor(h / 6).mul_(6))  # mod 6: H in [0, 6] (6 only by rounding, the same hue as 0)
    base = v - 2 * delta
    out = torch.empty_like(x)
    # |H - 3| <= 3 needs no wrapping; around the circle, green's distance is at most H + 1
    # and blue's 7 - H (both matter only below 2, where the clamp lets them through).
    for c, distance in enumerate(((h - 3).abs_(), torch.minimum((h - 5).abs_(), h + 1),
                                  torch.minimum((h - 1).abs_(), 7 - h))):
        torch.clamp(distance.mul_(delta).add_(base), low, v, out=out[:, c])
    return out


def color_jitter(x: torch.Tensor, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p: float = 0.8):
    """torchvision's ColorJitter with probability p, batched: each image draws its own
    factors and its own order of the four adjustments, as torchvision does (a randperm of
    four per image; SimCLR's code: random_order=True)."""
    n, dev = len(x), x.device

    def factor(strength):
        return torch.empty(n, 1, 1, 1, device=dev).uniform_(max(0.0, 1 - strength), 1 + strength)

    b, c, s = factor(brightness), factor(contrast), factor(saturation)  # drawn in this order, then the hue
    shift = torch.empty(n, 1, 1, device=dev).uniform_(-hue, hue)
    order = torch.rand(n, 4, device=dev).argsort(1)  # each image's own order of the four
    apply = torch.rand(n, 1, 1, 1, device=dev) < p
    # every image jittered, those not drawn for it kept as they came: each image's jitter is
    # its own, so this equals jittering only the drawn ones, without gathering them.
    return select(apply, jitter_colours(x, b, c, s, shift, order), x)


def jitter_colours(x: torch.Tensor, b, c, s, shift, order: torch.Tensor | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation by the factors b, c, s (N, 1, 1, 1) and hue by shift
    (N, 1, 1, a fraction of the circle), each as torchvision's adjust_*: a blend
    f img + (1 - f) other, clamped to [0, 1] (other: black, the grey image's mean, the grey
    image); the hue by _shift_hue. order (N, 4): each image's adjustments in its own order
    (0 brightness, 1 contrast, 2 saturation, 3 hue); None: in that order for all. The
    clamps make the order matter (and saturation and hue do not commute even without them)."""
    adjust, factors = (_brightness, _contrast, _saturation, _shift_hue), (b, c, s, shift)
    out = x.clone()
    if order is None:
        for j in range(4):
            out = adjust[j](out, factors[j])
        return out
    for k in range(4):  # each image's k-th adjustment: each of the four on the images whose k-th it is
        for j in range(4):
            i = (order[:, k] == j).nonzero().squeeze(1)
            if len(i):
                out[i] = adjust[j](out[i], factors[j][i])
    return out


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # in place: x * f, clamped
    return x.mul_(f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # in place: towards the grey image's mean
    mean = _grey(x).mean((1, 2, 3), keepdim=True)
    return x.mul_(f).add_(mean * (1 - f)).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # in place: towards the grey image
    grey = _grey(x).mul_(1 - f)
    return x.mul_(f).add_(grey).clamp_(0, 1)


def random_grayscale(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    apply = torch.rand(len(x), device=x.device) < p
    i = apply.nonzero().squeeze(1)  # only the images drawn for it
    out = x.clone()
    out[i] = _grey(x[i]).expand(-1, 3, -1, -1)
    return out


def gaussian_blur(x: torch.Tensor, sigma=(0.1, 2.0), p: float = 0.5, kernel_frac: float = 0.1) -> torch.Tensor:
    """Gaussian blur with probability p, per-image sigma, kernel 10% of the image side
    (SimCLR appendix A), as one grouped separable convolution for the whole batch."""
    n, c, h, w = x.shape
    k = max(3, int(kernel_frac * h) // 2 * 2 + 1)
    s = torch.empty(n, 1, device=x.device).uniform_(*sigma)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r.view(1, -1) ** 2) / (2 * s ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, k)
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c).view(n, c, h, w)
    apply = torch.rand(n, 1, 1, 1, device=x.device) < p
    return select(apply, y, x)


# ---------------------------------------------------------------------------
# Backbones: images -> feature vector, with the width of that vector
# ---------------------------------------------------------------------------
class SmallResNet(nn.Module):
    """A four-stage ResNet (one BasicBlock a stage) for CPU runs.

    Same attribute names as torchvision's ResNet (conv1, bn1, relu, maxpool,
    layer1..4, avgpool, fc), so code that walks a torchvision ResNet walks this
    too. The 3x3 stem has stride 2: at 32 px that is 4x cheaper than the CIFAR
    stem, which keeps the CPU defaults within a few minutes (widths 16..128)."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        stages, width = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or width != w:
                down = nn.Sequential(nn.Conv2d(width, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            stages.append(nn.Sequential(BasicBlock(width, w, stride, down)))
            width = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last spatial feature map (N, width, h, w), before pooling. Works for
    SmallResNet and torchvision's ResNets alike (same attribute names)."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))


def build_backbone(name: str, image_size: int, half: bool = False) -> tuple[nn.Module, int]:
    """(module mapping normalised images (N, 3, H, W) to features (N, width), width).

    half: the same network with half the channels at every stage (a quarter of the
    parameters, half the feature width), for split-brain's `--halves half`: two such
    halves together are as wide as one network (Zhang et al. 2017, sec. 3)."""
    if name == "small":
        return (SmallResNet((8, 16, 32, 64)), 64) if half else (SmallResNet(), 128)
    import torchvision
    if name not in ("resnet18", "resnet50"):
        fail(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    net = getattr(torchvision.models, name)(weights=None)
    width = _narrow(net, 2) if half else net.fc.in_features
    if image_size <= 64:
        # CIFAR stem (SimCLR paper, appendix B.9): a 3x3 stride-1 first convolution and
        # no max-pool, so 32 px images are not shrunk 4x before the first stage.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()  # the saved state_dict then matches torchvision's ResNet minus fc
    return net, width


def _narrow(net: nn.Module, divide: int) -> int:
    """Rebuild torchvision's ResNet `net` with every stage's channels divided by `divide`:
    the same blocks, depths and attribute names (so its state_dict keys are torchvision's),
    initialised as torchvision initialises its ResNets. Returns its feature width."""
    block = type(net.layer1[0])
    base = 64 // divide
    net.inplanes = base  # torchvision's _make_layer builds each stage from this width on
    net.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(base)
    for i in range(4):
        layer = f"layer{i + 1}"
        setattr(net, layer, net._make_layer(block, base * 2 ** i, len(getattr(net, layer)), stride=1 if i == 0 else 2))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net.inplanes  # the last stage's output channels


# ---------------------------------------------------------------------------
# Evaluation protocol: frozen features, weighted kNN and a linear probe
# ---------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, device, batch_size: int = 512, workers: int = 0):
    """Features of every image (no augmentation) and the labels, on `device`.

    `encoder` maps float RGB images in [0, 1] to features."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    workers = workers if isinstance(dataset, FolderImages) else 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers):
        feats.append(encoder(to_float(x, device)).float())
        labels.append(y.to(device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 200, temperature: float = 0.1,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (Wu et al. 2018, sec. 3.4; the MoCo CIFAR demo's monitor).

    Cosine similarity on L2-normalised features; each of the k nearest training
    features votes for its class with weight exp(similarity / temperature)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    train_feats = F.normalize(train_feats, dim=1)
    correct = 0
    for i in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[i:i + chunk], dim=1)
        sim, idx = (q @ train_feats.T).topk(k, dim=1)  # B x k
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return correct / len(test_feats)


def linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes: int | None = None,
                 epochs: int = 100, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 1e-4,
                 seed: int = 0) -> float:
    """Top-1 of a linear classifier trained on frozen features.

    Features are standardised with the training split's mean and std (what a
    BatchNorm without affine parameters in front of the classifier does, as in
    MAE's linear probe), then Adam with cosine decay fits the classifier."""
    num_classes = num_classes or int(train_labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    clf = nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf.reset_parameters()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(xtr), generator=gen).to(xtr.device)
            for i in range(0, len(xtr), batch_size):
                b = order[i:i + batch_size]
                loss = F.cross_entropy(clf(xtr[b]), train_labels[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return (clf(xte).argmax(1) == test_labels).float().mean().item()


def evaluate(encoder: nn.Module, random_encoder: nn.Module, data: ImageData, device, workers: int = 0,
             neighbours: Path | None = None) -> dict:
    """The common protocol: kNN and linear probe for the trained and a random-init encoder.

    Both encoders map float RGB in [0, 1] to features; the random one has the same
    architecture, freshly initialised, so the gain over it is what the method learned.
    With `neighbours`, also draws each encoder's nearest training images of a few fixed
    test images there (from the same features)."""
    results, feats = {}, {}
    for prefix, enc in (("", encoder), ("random_", random_encoder)):
        enc = enc.to(device)
        ftr, ytr = extract_features(enc, data.train, device, workers=workers)
        fte, yte = extract_features(enc, data.test, device, workers=workers)
        results[prefix + "knn_top1"] = knn_accuracy(ftr, ytr, fte, yte, num_classes=data.num_classes)
        results[prefix + "linear_top1"] = linear_probe(ftr, ytr, fte, yte, num_classes=data.num_classes)
        feats[prefix] = (ftr, fte)
    if neighbours is not None:
        save_neighbours(neighbours, data, feats[""], feats["random_"], ytr, yte)
    return results


def query_images(test_labels: torch.Tensor, count: int = 8) -> list[int]:
    """Fixed test images to show neighbours of, spread over the classes: the first test
    image of each class in turn (class 0, 1, ...), the same in every run and method."""
    firsts = {}
    for i, y in enumerate(test_labels.tolist()):
        firsts.setdefault(y, []).append(i)
    picks, round_ = [], 0
    while len(picks) < min(count, len(test_labels)):
        for y in sorted(firsts):
            if round_ < len(firsts[y]) and len(picks) < count:
                picks.append(firsts[y][round_])
        round_ += 1
    return picks


@torch.no_grad()
def nearest_neighbours(train_feats: torch.Tensor, query_feats: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (Q, k) of the k training features of highest cosine similarity to each
    query, most similar first: the neighbours the kNN monitor votes with."""
    sim = F.normalize(query_feats, dim=1) @ F.normalize(train_feats, dim=1).T
    return sim.topk(min(k, len(train_feats)), dim=1).indices


def save_neighbours(path: Path, data: ImageData, trained: tuple, random: tuple, train_labels, test_labels,
                    queries: int = 8, k: int = 7):
    """neighbours.png: a row per fixed test image: the image, then its k nearest training
    images under the trained encoder; below, the same under the random-init encoder. A
    neighbour's border is green when it shares the query's class, red when not."""
    import torchvision.utils as vutils
    picks = query_images(test_labels.cpu(), queries)
    tiles = []
    for train_feats, test_feats in (trained, random):
        near = nearest_neighbours(train_feats, test_feats[picks], k).cpu()
        for q, row in zip(picks, near.tolist()):
            tiles.append(_framed(data.test[q][0], (0.5, 0.5, 0.5)))
            for i in row:
                same = int(train_labels[i]) == int(test_labels[q])
                tiles.append(_framed(data.train[i][0], (0.1, 0.8, 0.1) if same else (0.9, 0.1, 0.1)))
    grid = vutils.make_grid(torch.stack(tiles), nrow=k + 1, padding=2, pad_value=1.0)
    # a white band between the trained block (top) and the random-init block (bottom)
    half = grid.shape[1] // 2
    grid = torch.cat([grid[:, :half], torch.ones(3, 6, grid.shape[2]), grid[:, half:]], dim=1)
    save_picture(path, grid, padding=0)


def _framed(image: torch.Tensor, colour, width: int = 2) -> torch.Tensor:
    """uint8 (3, S, S) -> float with a `width` px border of `colour`."""
    x = image.float() / 255
    return torch.cat([F.pad(x[c:c + 1], (width,) * 4, value=colour[c]) for c in range(3)])


# ---------------------------------------------------------------------------
# Run plumbing: device, torchrun, seeds, run folder, log, checkpoints, signals
# ---------------------------------------------------------------------------
def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device '{name}' (auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} asked for, but no CUDA GPU is available (try --device auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"--device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail("--device mps asked for, but MPS (Apple silicon) is not available here (try --device auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name} is not supported (auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to 0 (SGDR, Loshchilov & Hutter 2017)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's learning rate; returns it, for the progress line."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def uses_channels_last(device: torch.device) -> bool:
    """Whether models and inputs go channels_last on this device: faster convolutions on
    CUDA, and faster for the small backbone on CPU too (measured by hand); MPS gains nothing."""
    return device.type in ("cuda", "cpu")


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


_OPEN_RUNS: list = []  # Runs not closed yet; run_main closes them, whatever happened


class _Sampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `skip` indices, so a
    run resumed in the middle of an epoch does not even read the batches it trained on."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


class Run:
    """One training run: where it runs, what it prints, what it saves, when it stops.

    Single process when started with `python`, one process per GPU (or CPU worker)
    under `torchrun`; only rank 0 prints and writes files. The training loop is
    `for step, batch in run.steps(loader, parts)`: that iterator resumes, saves
    checkpoints and stops on a signal, so the loop body holds the method alone."""

    def __init__(self, args, method: str):
        self.args, self.method = args, method
        self._old_handlers, self._log_file, self._lock = {}, None, None  # close() may run before __init__ is through
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world > 1
        self.is_main = self.rank == 0
        self.device = pick_device(args.device, self.local_rank)
        self.resume_from = Path(args.resume) if args.resume else None
        self._resume_state = self._read_resume_state() if args.resume else None
        self.out = self._check_out()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        _OPEN_RUNS.append(self)  # from here on, run_main closes this run whatever happens
        self.cuda = self.device.type == "cuda"
        self.amp = args.amp and self.cuda
        self.channels_last = uses_channels_last(self.device)
        # The optimizers' fused kernels (torch.optim's fused=True, on CPUs and CUDA): the same
        # update as the loop over parameters, in one pass; about 3x faster on a CPU.
        self.fused = self.device.type in ("cpu", "cuda")
        # Each process gets its own seed so augmentations differ between processes; what the
        # run keeps still starts equal: steps() gives every process rank 0's (see _share).
        torch.manual_seed(args.seed + self.rank)

        if not self.out:
            self.out = self._new_folder()
        self.checkpoint_path = self.out / "checkpoint.pt"
        self._saved = (self._resume_state["step"], self.resume_from) if self._resume_state else None
        if self.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                fail(f"cannot make the run folder {self.out}: {e.strerror}", code=WRITE_FAILED)
            self._lock = _lock_folder(self.out)  # before anything is written: one run per folder
            self._write_config()
            copy_log = self.resume_from and self.out.resolve() != self.resume_from.resolve()
            try:
                if copy_log and (self.resume_from / "log.jsonl").is_file():
                    shutil.copyfile(self.resume_from / "log.jsonl", self.out / "log.jsonl")
                # A new run owns its folder: a log left by a run that never saved a checkpoint goes.
                self._log_file = open(self.out / "log.jsonl", "a" if args.resume else "w")
            except OSError as e:
                raise WriteFailed(self.out / "log.jsonl", e) from None

        self.step = self.epoch = self.steps_per_epoch = self.total_steps = self.last_step = 0  # set by steps()
        # _signalled: the signal this process's handler saw; stop_signal: the one all processes
        # agreed on (_flags), the only one the loop acts on.
        self._signalled = self.stop_signal = 0
        self._stop_time, self._in_steps = 0.0, False
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._meter, self._last_print, self._start = {}, time.time(), time.time()
        self._images_since, self._first_step, self._monitor_seconds = 0, 0, 0.0
        self._images_total, self._train_end = 0, None  # for the training throughput in eval.json
        self.print(f"{method}: device {self.device}, {self.world} process(es), run folder {self.out}")

    # -- the run folder -----------------------------------------------------------
    def _read_resume_state(self) -> dict:
        state = read_checkpoint(self.resume_from / "checkpoint.pt")
        if state.get("method", self.method) != self.method:
            fail(f"--resume {self.resume_from} holds a {state['method']} run, not a {self.method} run")
        if state.get("world", self.world) != self.world:
            fail(f"--resume {self.resume_from}: that run had {state['world']} process(es), this one has {self.world}; "
                 f"the global batch and the data order depend on it (torchrun --nproc_per_node={state['world']})")
        return state

    def _check_out(self) -> Path | None:
        """The run folder when it is given (None: make a new one), refusing one that holds
        another run's checkpoint before anything is written."""
        args = self.args
        if args.resume:
            out = Path(args.out or args.resume)
            if out.resolve() != self.resume_from.resolve() and (out / "checkpoint.pt").exists():
                fail(f"--out {out} holds another run's checkpoint; to continue {args.resume} in a new folder, "
                     f"give --out a folder without one")
            return out
        if args.out:
            if (Path(args.out) / "checkpoint.pt").exists():
                fail(f"--out {args.out} holds a run already (checkpoint.pt); continue it with --resume {args.out}, "
                     f"or choose another --out")
            return Path(args.out)
        return None

    def _new_folder(self) -> Path:
        """runs/<method>-<date>-<time>, with -2, -3, ... if runs started in the same second."""
        holder = [""]
        if self.is_main:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            for n in itertools.count(1):
                out = Path("runs") / (f"{self.method}-{stamp}" + (f"-{n}" if n > 1 else ""))
                try:
                    out.mkdir(parents=True)
                    break
                except FileExistsError:
                    continue
            holder = [str(out)]
        if self.distributed:
            dist.broadcast_object_list(holder, src=0)  # one folder for all processes
        return Path(holder[0])

    def _write_config(self):
        """config.json: the options of the run, written once. A resume appends what it
        changed to the list "resumes" instead of rewriting the record."""
        path, options = self.out / "config.json", dataclasses.asdict(self.args)
        if not self.args.resume:
            config = {**options, "world_size": self.world}
        else:
            old = self.resume_from / "config.json"
            config = json.loads(old.read_text()) if old.is_file() else dict(self._resume_state.get("args", {}))
            entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                     "at_step": self._resume_state["step"],
                     "changed": getattr(self.args, "changed_on_resume", {})}
            if self.out.resolve() != self.resume_from.resolve():
                entry["from"] = str(self.resume_from)
            config.setdefault("resumes", []).append(entry)
        _write_atomic(path, lambda f: f.write_text(json.dumps(config, indent=2) + "\n"))

    # -- printing and logging ---------------------------------------------------
    def print(self, *a, **k):
        if self.is_main:
            print(*a, **k, flush=True)

    def log(self, images: int, **metrics):
        """Accumulate this step's metrics; print and write a log line every --log-every
        seconds and at the last step."""
        step = self.step + 1  # steps done, this one included
        for k, v in metrics.items():
            s, n = self._meter.get(k, (0.0, 0))
            self._meter[k] = (s + float(v), n + 1)
        self._images_since += images * self.world
        self._images_total += images * self.world
        now = self._train_end = time.time()
        if step != self.last_step and now - self._last_print < self.args.log_every:
            return
        means = {k: s / n for k, (s, n) in self._meter.items()}
        rate = self._images_since / max(now - self._last_print, 1e-9)
        elapsed = now - self._start
        eta = elapsed / max(step - self._first_step, 1) * (self.last_step - step)
        record = {"epoch": self.epoch + 1, "step": step, **means, "images_per_s": rate, "elapsed_s": elapsed}
        parts = [f"epoch {self.epoch + 1}/{self.args.epochs}", f"step {step}/{self.last_step}"]
        parts += [f"{k} {v:.4g}" for k, v in means.items()]
        parts += [f"{rate:.0f} img/s", f"left {format_seconds(eta)}"]
        self.print(" | ".join(parts))
        self._write_log(record)
        self._meter, self._images_since, self._last_print = {}, 0, now

    def _write_log(self, record: dict):
        if self._log_file:
            try:
                self._log_file.write(json.dumps(record) + "\n")
                self._log_file.flush()
            except OSError as e:  # a full disk: the progress is still printed; the checkpoint says what it can
                warn_once("log", f"{WriteFailed(self.out / 'log.jsonl', e)}; the run goes on, printing its progress, "
                                 f"without log.jsonl")

    def check_finite(self, loss: torch.Tensor):
        """Stop (exit code 1) when the loss is NaN or infinite, before it reaches the weights.
        Checkpoints are only written from finite weights, so the one kept is good."""
        if not torch.isfinite(loss).item():
            fail(f"the loss became {loss.item()} at step {self.step + 1}; stopping, {self._kept()}. "
                 f"Try a lower --lr.", code=1)

    # -- the training loop's plumbing ---------------------------------------------
    def steps(self, loader: DataLoader, parts: dict, epoch_end=None, monitor=None):
        """Yield (step, batch) from where the run is (0, or the checkpoint's step after
        --resume) to the end of training or --max-steps; `step` counts the optimiser steps
        before this batch. `parts` (name -> model, optimiser or tensor) is what a checkpoint
        holds. Between steps: the checkpoint at each epoch end, every --save-every minutes,
        at the end and before leaving on SIGINT/SIGTERM; epoch_end() after each epoch and at
        the end, on the first process. monitor = (data, encoder): the kNN learning curve,
        encoder() giving the current encoder (see _monitor)."""
        self.steps_per_epoch = len(loader)
        self.total_steps = self.args.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, self.args.max_steps) if self.args.max_steps else self.total_steps
        step = self.step = self._restore(parts)
        if step == 0 and self.distributed:
            self._share(parts)  # every process starts from rank 0's state (a resumed run: from the checkpoint's)
        self.epoch = min(step // self.steps_per_epoch, self.args.epochs - 1)
        self._first_step, self._start, self._last_print = step, time.time(), time.time()
        self._last_save = self._epoch_start = time.time()
        self._monitor_every, self._monitor_seconds = self.args.monitor_every, 0.0
        first = -(-max(step // self.steps_per_epoch + 1, 1) // max(self._monitor_every, 1)) * self._monitor_every
        self._next_monitor = first if self._monitor_every > 0 else None  # the first epoch (a multiple) to monitor
        if step == 0 and monitor is not None and self.is_main:
            self._monitor(*monitor, before=True)  # the learning curve's first point: the untrained encoder
        self._in_steps = True  # a first signal now waits for the end of the step
        try:
            while step < self.last_step:
                self.epoch, skip = divmod(step, self.steps_per_epoch)
                for batch in self._batches(loader, self.epoch, skip):
                    yield step, batch
                    step = self.step = step + 1
                    stop, due = self._flags()
                    epoch_done = step % self.steps_per_epoch == 0
                    if stop or due or epoch_done or step == self.last_step:
                        self._save(parts)
                    if stop:
                        break
                    if (epoch_done or step == self.last_step) and epoch_end is not None and self.is_main:
                        epoch_end()
                    if epoch_done and monitor is not None and self.is_main:
                        self._monitor(*monitor)
                    if step >= self.last_step:
                        break
                if self.stop_signal:
                    break
            if not self.stop_signal:  # one that came after the last step's agreement (during epoch_end())
                self._flags()
        finally:
            self._in_steps = False
        if self.stop_signal:
            self.print(f"stopped at step {step}; continue with: {self._launcher()} {self.method}.py --resume {self.out}")
            raise Stopped(self.stop_signal)
        if self.distributed:  # training is over: leave the group together; rank 0 evaluates alone
            dist.barrier()
            dist.destroy_process_group()

    def _monitor(self, data: ImageData, encoder, train_images: int = 2000, test_images: int = 1000,
                 before: bool = False):
        """The kNN monitor every --monitor-every epochs (the MoCo CIFAR demo's learning curve):
        weighted kNN top-1 of encoder() on fixed, evenly spaced subsets of the training and
        test splits, before training (epoch 0) and after epochs, printed and written to
        log.jsonl as {"epoch", "step", "knn_top1"}. It
        never takes more than 10% of the training time: when a run costs more than that
        of the epochs since the last one, the next comes as many epochs later as keep it
        under 10%, and the progress says so. Its time is not counted as training time."""
        epoch_seconds, self._epoch_start = time.time() - self._epoch_start, time.time()
        done = self.step // self.steps_per_epoch
        if self._next_monitor is None or (done < self._next_monitor and not before):
            return
        start = time.time()
        subsets = [torch.utils.data.Subset(d, torch.linspace(0, len(d) - 1, min(n, len(d))).long().tolist())
                   for d, n in ((data.train, train_images), (data.test, test_images))]
        enc = encoder().to(self.device)
        # Its own random state (a DataLoader draws a seed): training goes on as without the monitor.
        with torch.random.fork_rng(devices=[self.device] if self.cuda else []):
            (ftr, ytr), (fte, yte) = (extract_features(enc, d, self.device, workers=self.args.workers)
                                      for d in subsets)
        knn = knn_accuracy(ftr, ytr, fte, yte, num_classes=data.num_classes)
        took = time.time() - start
        self._monitor_seconds += took
        self._epoch_start += took
        self.print(f"epoch {done}/{self.args.epochs} | kNN monitor {knn:.4f} "
                   f"({len(subsets[0])} training / {len(subsets[1])} test images, {took:.1f} s)")
        self._write_log({"epoch": done, "step": self.step, "knn_top1": knn})
        if before:  # the curve's first point, the encoder before training: nothing to pace yet
            return
        every = max(self._monitor_every, math.ceil(took / max(0.1 * epoch_seconds, 1e-9)))
        if every > self._monitor_every:
            self.print(f"kNN monitor: {took:.2f} s against {epoch_seconds:.2f} s of training an epoch; every {every} "
                       f"epochs from now on, to stay under 10% of the time")
            self._monitor_every = every
        self._next_monitor = done + self._monitor_every

    def _batches(self, loader: DataLoader, epoch: int, skip: int):
        """The epoch's batches in the sampler's order for `epoch`, from batch `skip` on."""
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = skip * loader.batch_size
        # Worker seeds come from the loader's generator: make them depend on (seed, rank, epoch)
        # alone, so a resumed epoch's workers draw what the uninterrupted run's drew.
        loader.generator.manual_seed((self.args.seed * 1_000_003 + epoch) * 1009 + self.rank)
        try:
            yield from loader
        finally:
            loader.sampler.skip = 0

    def _flags(self) -> tuple[int, bool]:
        """(signal to stop on or 0, whether a --save-every checkpoint is due), agreed by all
        processes so that none waits in a collective the others left."""
        due = self.args.save_every > 0 and time.time() - self._last_save >= 60 * self.args.save_every
        if not self.distributed:
            self.stop_signal = self._signalled
            return self.stop_signal, due
        t = torch.tensor([self._signalled, int(due)], device=self.device if self.device.type != "mps" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        # Decide on the reduced values alone: a signal handled just after the all_reduce, on one
        # process, must wait for the next step's agreement; acting on it at once would send that
        # process into _save()'s collective while the others go on to the next step (a hang).
        self.stop_signal = int(t[0])
        if self.stop_signal and not self._signalled:  # another process was signalled first
            self._signalled, self._stop_time = self.stop_signal, time.time()
        return self.stop_signal, bool(t[1])

    def _on_signal(self, signum, frame):
        if self._in_steps and not self._signalled:
            self._signalled, self._stop_time = signum, time.time()
            self.print(f"\nsignal {signum}: saving a checkpoint after this step, then stopping "
                       f"(a second signal stops at once) ...")
            return
        if self._in_steps and signum == self._signalled and time.time() - self._stop_time < 1:
            # The same request again: a terminal's Ctrl-C (or a scheduler's SIGTERM) reaches torchrun
            # as well as its processes, and torchrun passes it on. Only a later one means "now".
            return
        # Outside the steps (loading data, evaluating) or a second signal: leave now.
        self.print(f"\nsignal {signum}: stopping now; {self._kept()}")
        raise Stopped(signum)

    def _launcher(self) -> str:
        """How this run was started, for the command that continues it (with as many processes)."""
        if not self.distributed:
            return "python"
        if int(os.environ.get("LOCAL_WORLD_SIZE", self.world)) == self.world:
            return f"torchrun --nproc_per_node={self.world}"
        return f"torchrun (as before: {self.world} processes)"

    def _kept(self) -> str:
        if self._saved is None:
            return "no checkpoint was saved yet"
        step, folder = self._saved
        return f"the checkpoint of step {step} is kept in {folder} (continue with: --resume {folder})"

    # -- checkpoints ------------------------------------------------------------
    def _save(self, parts: dict):
        """The checkpoint dict (each part's state, epoch, step, options, every process's
        random state), written atomically; never from NaN or infinite weights."""
        step = self.step
        if not _all_finite(parts):
            fail(f"the weights became NaN or infinite by step {step}; they are not saved, {self._kept()}. "
                 f"Try a lower --lr.", code=1)
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(self.device)} if self.cuda else {})}
        rngs = [rng]
        if self.distributed:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        if self.is_main:
            state = {name: part if isinstance(part, torch.Tensor) else unwrap(part).state_dict()
                     for name, part in parts.items()}
            state.update(epoch=step // self.steps_per_epoch, step=step, method=self.method, world=self.world,
                         args=dataclasses.asdict(self.args), rng=rngs)
            try:
                _write_atomic(self.checkpoint_path, lambda f: torch.save(state, f))
            except WriteFailed as e:  # the last good checkpoint stays as it was
                fail(f"{e}; stopping at step {step}, {self._kept()}", code=WRITE_FAILED)
        self._saved, self._last_save = (step, self.out), time.time()

    @torch.no_grad()
    def _share(self, parts: dict):
        """Rank 0's parts to every process, before the first step. Each process seeds its
        random state with --seed + rank (its augmentations differ), so whatever a method
        builds at random or from the data it sees starts different on each: DDP makes the
        module it wraps equal, and only that one. Everything else the checkpoint holds (MoCo's
        key encoder f_k and queue, its memory bank, video colorization's colour centres) is
        made equal here; the methods then change it only by values every process has (DDP's
        averaged gradients, gathered keys). Optimisers hold no state before the first step."""
        for part in parts.values():
            if isinstance(part, torch.optim.Optimizer):
                continue
            for t in [part] if isinstance(part, torch.Tensor) else unwrap(part).state_dict().values():
                on_device = t.to(self.device)  # NCCL sends GPU tensors only (jigsaw's permutations are on the CPU)
                dist.broadcast(on_device, src=0)
                if on_device is not t:
                    t.copy_(on_device)

    def _restore(self, parts: dict) -> int:
        """Load --resume's checkpoint into `parts` and this process's random state; its step."""
        state = self._resume_state
        if state is None:
            return 0
        for name, part in parts.items():
            if name not in state:
                fail(f"{self.resume_from / 'checkpoint.pt'} has no '{name}': it was saved by another version "
                     f"of {self.method}.py")
            try:
                part.copy_(state[name]) if isinstance(part, torch.Tensor) else unwrap(part).load_state_dict(state[name])
            except (RuntimeError, ValueError) as e:
                fail(f"{self.resume_from / 'checkpoint.pt'}: '{name}' does not fit this model "
                     f"({str(e).splitlines()[0][:200]})")
        rngs = state.get("rng") or [{"cpu": state["rng_cpu"], **({"cuda": state["rng_cuda"]} if "rng_cuda" in state else {})}]
        if self.rank < len(rngs):  # older checkpoints hold rank 0's state only
            torch.set_rng_state(rngs[self.rank]["cpu"])
            if self.cuda and "cuda" in rngs[self.rank]:
                torch.cuda.set_rng_state(rngs[self.rank]["cuda"], self.device)
        changed = getattr(self.args, "changed_on_resume", {})
        said = "; changed: " + ", ".join(f"{_flag(k)} {a} -> {b}" for k, (a, b) in changed.items()) if changed else ""
        self.print(f"resumed {self.resume_from} at step {state['step']} with its own options{said}")
        self._write_log({"event": "resume", "step": state["step"], "changed": changed})
        self._resume_state = None
        return state["step"]

    def save_encoder(self, backbone: nn.Module, name: str = "encoder.pt"):
        self.save(unwrap(backbone).state_dict(), name)

    def save(self, obj, name: str):
        """torch.save(obj) as the run folder's file `name`, atomically, on the first process. A
        failed write ends the run (exit code 3); the checkpoint already written is kept."""
        if self.is_main:
            try:
                _write_atomic(self.out / name, lambda f: torch.save(obj, f))
            except WriteFailed as e:
                fail(f"{e}; {self._kept()}", code=WRITE_FAILED)

    # -- data, models, end --------------------------------------------------------
    def loader(self, dataset: Dataset, train: bool = True) -> DataLoader:
        """Batches of args.batch_size for this process; the order depends on (seed, epoch) only."""
        sampler = _Sampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=train,
                           seed=self.args.seed, drop_last=train)
        workers = self.args.workers if isinstance(dataset, FolderImages) else 0
        if train and len(sampler) < self.args.batch_size:
            fail(f"--batch-size {self.args.batch_size} is larger than the {len(sampler)} training images per process")
        # The loader's own generator: a DataLoader draws the workers' base seed from the
        # generator it has at every epoch, and drawing from the global one would shift the
        # augmentations of a resumed run away from those of the uninterrupted run.
        gen = torch.Generator().manual_seed(self.args.seed + self.rank)
        whole = getattr(dataset, "whole_images", False)
        return DataLoader(dataset, batch_size=self.args.batch_size, sampler=sampler, num_workers=workers,
                          drop_last=train, pin_memory=self.cuda, persistent_workers=workers > 0, generator=gen,
                          collate_fn=collate_whole if whole else None)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device (channels_last on CUDA and CPU), wrap in DDP under torchrun, and
        compile with --compile. unwrap() gives the plain module back."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.distributed:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda else None)
        if self.args.compile:
            model = torch.compile(model)
        return model

    def to_device(self, images):
        """A batch from the loader, moved to this run's device; nothing is cropped here. Images
        that are all --image-size squares (the built-in data, CIFAR-10, a folder of 32 px
        JPEGs at --image-size 32) become a float batch in [0, 1]. Whole photos of other
        sizes stay WholeImages (uint8, kept at the load size), which each method crops as
        its own paper does (its `augment` or crop function)."""
        if isinstance(images, WholeImages) and bool((images.sizes == self.args.image_size).all()):
            images = images.pixels  # already --image-size squares: no padding, nothing to crop
        if not isinstance(images, WholeImages):
            return to_float(images, self.device)
        return WholeImages(images.pixels.to(self.device, non_blocking=True), images.sizes.to(self.device))

    def format(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input memory layout (channels_last on CUDA, as prepare() set the model)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def finish(self, results: dict, data: ImageData | None = None, encoder: nn.Module | None = None,
               random_encoder=None) -> dict:
        """The end of a run. With --eval and an `encoder`, first the common protocol on it
        (kNN, linear probe, neighbours.png) beside the random-init one, which
        `random_encoder()` builds right after the seed is reset to --seed (so every run of a
        seed compares with the same random network). Then eval.json and the final line."""
        if encoder is not None and self.args.eval:
            torch.manual_seed(self.args.seed)
            results.update(evaluate(encoder, random_encoder(), data, self.device, self.args.workers,
                                    neighbours=self.out / "neighbours.png" if self.is_main else None))
        if self.is_main:
            results = {"method": self.method, **results}
            if self._train_end is not None:  # training only: from the first step (or the resume) to the last
                seconds = self._train_end - self._start - self._monitor_seconds
                results.update(train_seconds=seconds, train_images_per_s=self._images_total / max(seconds, 1e-9))
            if self.cuda:
                results["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            try:
                _write_atomic(self.out / "eval.json", lambda f: f.write_text(json.dumps(results, indent=2) + "\n"))
            except WriteFailed as e:
                fail(f"{e}; the trained encoder is in {self.out / 'encoder.pt'}, and --resume {self.out} evaluates "
                     f"it again", code=WRITE_FAILED)
            line = [f"{self.method} done"]
            for key in ("knn_top1", "linear_top1"):
                if key in results:
                    line.append(f"{key} {results[key]:.4f} (random init {results['random_' + key]:.4f})")
            self.print(" | ".join(line) + f" | results in {self.out / 'eval.json'}")
        self.close()
        return results

    def close(self):
        """Restore the signal handlers, close the log, leave the process group. Safe to call twice."""
        if self in _OPEN_RUNS:
            _OPEN_RUNS.remove(self)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self._log_file:
            try:
                self._log_file.close()
            except OSError:  # the last lines could not be flushed to a full disk: warned already
                pass
            self._log_file = None
        if self._lock:
            self._lock.close()  # the folder is free for the next run
            self._lock = None
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _lock_folder(out: Path):
    """Hold the run folder for as long as this run lives: an exclusive flock on out/.lock,
    which the OS releases when the process ends however it ends (a crash, kill -9), so no
    stale lock is ever left. A second run on the folder, new or --resume, refuses at once,
    naming the process that holds it. (No lock where fcntl is missing: Windows.)"""
    try:
        import fcntl
    except ImportError:
        return None
    import socket
    try:
        f = open(out / ".lock", "a+")
    except OSError as e:
        raise WriteFailed(out / ".lock", e) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid, host = (f.read().split() + ["?", "?"])[:2]
        f.close()
        fail(f"run folder {out} is in use by process {pid} on host {host}; wait for that run to end, or give "
             f"another --out")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {socket.gethostname()}\n")
    f.flush()
    return f


def _write_atomic(path: Path, write):
    """write(tmp_path), then rename over `path`: a crash never leaves half a file. Every file a
    run writes goes through here. A write that fails (OSError: a full disk, a quota; or
    torch.save's RuntimeError when its writer cannot write) leaves `path` as it was, removes
    the temporary file and raises WriteFailed (exit code 3) naming the file, the error and
    the free space left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_write_error(e):
            raise
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteFailed(path, e) from None


def _is_write_error(e: RuntimeError) -> bool:
    """torch.save reports a failed write as a RuntimeError from its C++ writer."""
    text = str(e)
    return any(s in text for s in ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed"))


def save_picture(path: Path, images: torch.Tensor, nrow: int = 8, padding: int = 1) -> bool:
    """A PNG of `images` (a batch, laid out in a grid, or one image), written atomically. A
    picture that cannot be written is a warning, not the end of the run: the checkpoint
    and the encoder are written apart from it. Returns whether it was written."""
    import torchvision.utils as vutils
    try:
        _write_atomic(Path(path), lambda f: vutils.save_image(images, f, nrow=nrow, padding=padding, format="png"))
        return True
    except WriteFailed as e:
        warn_once(f"picture {path}", f"{e}; the run goes on without this picture")
        return False


@torch.no_grad()
def _all_finite(parts: dict) -> bool:
    """Whether every floating-point weight and buffer of the modules in `parts` is finite (one sync)."""
    tensors = [t for part in parts.values() if isinstance(part, nn.Module)
               for t in part.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over processes and returns this
    process's slice. When every process computes the same loss on the gathered
    tensor, that makes DDP's gradient average equal the one-process gradient."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (same shape on every process) from all processes, in rank order;
    gradients flow back to each process's own part. Identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all processes in rank order, without gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


if __name__ == "__main__":  # python common.py --help: the index above
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
