"""CIFAR-10 as a folder of JPEGs, the copy the CIFAR-10 tables of RESULTS.md ran on:
train/<class>/NNNN.jpg (5,000 a class) and test/<class>/NNNN.jpg (1,000 a class), 32 px,
JPEG quality 75, from torchvision's CIFAR-10.

    python benchmarks/cifar_jpegs.py --data-dir data --download --out data/cifar10-jpg
    python benchmarks/compare.py --dataset folder --data-dir data/cifar10-jpg --epochs 3 --out runs/compare-cifar

The images are numbered by their order in torchvision's arrays, within each class. Another
JPEG encoder (another Pillow) may differ in the last bits of a few pixels, so figures on
such a copy may differ slightly from the tables'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", help="where torchvision's CIFAR-10 is (or goes, with --download)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 into --data-dir")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality")
    a = p.parse_args(argv)
    import torchvision.datasets as tvd
    from PIL import Image
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        common.fail(f"--out {out} is not empty; choose a new folder")
    try:
        parts = {split: tvd.CIFAR10(a.data_dir, train=split == "train", download=a.download)
                 for split in ("train", "test")}
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        common.fail(f"cifar10 not found in {a.data_dir} ({e}); pass --download, or --data-dir pointing at it")
    except OSError as e:
        common.fail(f"could not download cifar10 into {a.data_dir}: {e}")
    for split, data in parts.items():
        counts = [0] * len(data.classes)
        for pixels, label in zip(data.data, data.targets):
            folder = out / split / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{counts[label]:04d}.jpg", quality=a.quality)
            counts[label] += 1
        print(f"{split}: {len(data.data)} images in {len(data.classes)} class folders under {out / split}", flush=True)
    return out


if __name__ == "__main__":
    common.cli(main)
