"""Training images per second of the project's image-folder pipeline against torchvision's
standard one, on the same folder, with the same output and the same DataLoader workers.

    python benchmarks/data_pipeline.py --data-dir DAVIS_DIR/JPEGImages/480p   # any folder --dataset folder reads
    python benchmarks/data_pipeline.py --data-dir DIR --size 224 --workers 8 --device cuda

Every pipeline turns the folder's training images into batches of --size px training
crops (RandomResizedCrop, scale 0.08 to 1, and a horizontal flip), float in [0, 1] on
--device, --batch-size at a time, --passes times over the images:

  torchvision   ImageFolder (PIL decoding) + transforms.v2 RandomResizedCrop(size),
                RandomHorizontalFlip, ToImage, ToDtype, in --workers processes
  ours, disk    what a folder too large for memory gets: torchvision.io decoding and a
                uint8 resize to the load size (size / 0.875) in --workers processes, then
                the batched crops on --device (common.FolderImages, common.random_resized_crop)
  ours, memory  what a folder that fits gets: decoded once (timed on its own row), then
                every epoch only the batched crops from the whole images kept in memory
  decoding      each decoder common.read_image can use (TorchCodec when installed,
                torchvision.io, PIL) alone, in this process, on the same files

Output: one markdown table, images/s and the ratio to torchvision's pipeline; the decoder
common.read_image takes here is named under it. --result FILE keeps the raw figures
(benchmarks/report.py renders them into the docs).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from registry import provenance, save_result  # noqa: E402


def _timed(batches, device, passes: int) -> float:
    """Images per second over `passes` passes of the iterable of float batches."""
    count, start = 0, time.perf_counter()
    for _ in range(passes):
        for x in batches():
            count += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def torchvision_pipeline(train, size, a, device):
    from torchvision import datasets
    from torchvision.transforms import v2
    samples = [s for s, _ in train]
    transform = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True)])

    class Files(torch.utils.data.Dataset):  # ImageFolder's loading and transform, on our file list
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return transform(datasets.folder.default_loader(samples[i])), 0

    loader = DataLoader(Files(), batch_size=a.batch_size, num_workers=a.workers, persistent_workers=a.workers > 0,
                        pin_memory=device.type == "cuda")
    return lambda: (x.to(device, non_blocking=True) for x, _ in loader)


def _crops(images, size, device):
    x = common.WholeImages(images.pixels.to(device), images.sizes.to(device)) \
        if isinstance(images, common.WholeImages) else common.to_float(images, device)
    return common.random_resized_crop(x, size=size)


def ours_from_disk(train, size, a, device):
    data = common.FolderImages(train, size, 0, "train")
    loader = DataLoader(data, batch_size=a.batch_size, num_workers=a.workers, persistent_workers=a.workers > 0,
                        collate_fn=common.collate_whole, pin_memory=device.type == "cuda")
    return lambda: (_crops(x, size, device) for x, _ in loader)


def ours_in_memory(train, size, a, device):
    start = time.perf_counter()
    decoded = common.decode_to_memory(train, size, 0, a.workers)
    decode_rate = len(train) / (time.perf_counter() - start)
    data = common.RaggedImages(**decoded["whole"]) if decoded["whole"] else \
        common.TensorImages(decoded["squares"], decoded["labels"])
    loader = DataLoader(data, batch_size=a.batch_size, collate_fn=common.collate_whole)  # in memory: no workers
    return (lambda: (_crops(x, size, device) for x, _ in loader)), decode_rate


def decoding_rates(train, files: int = 300) -> list[tuple[str, float | None]]:
    """Images per second of each decoder alone on the first `files` training files, or None
    where it is not installed."""
    paths = [p for p, _ in train][:files]
    rates = []
    for name, decode in common.DECODERS.items():
        try:
            decode(paths[0])
        except ImportError:
            rates.append((name, None))
            continue
        start = time.perf_counter()
        for p in paths:
            decode(p)
        rates.append((name, len(paths) / (time.perf_counter() - start)))
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="an image folder in any layout --dataset folder reads")
    p.add_argument("--size", type=int, default=224, help="side of the training crops")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes, the same for both pipelines")
    p.add_argument("--passes", type=int, default=3, help="passes over the training images for each timing")
    p.add_argument("--device", default="cpu", help="where the batches go (and our crops happen): cpu | cuda")
    p.add_argument("--result", help="also keep the raw figures here (results/<name>.json, for benchmarks/report.py)")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice about TorchCodec
    device = common.pick_device(a.device)
    started = time.time()
    _, train, _, summary = common.folder_splits(Path(a.data_dir))
    print(summary, flush=True)
    rows = []
    reference = _timed(torchvision_pipeline(train, a.size, a, device), device, a.passes)
    rows.append(("torchvision: ImageFolder + transforms.v2, in the workers", reference))
    rows.append(("ours, disk: torchvision.io + uint8 resize in the workers, batched crops",
                 _timed(ours_from_disk(train, a.size, a, device), device, a.passes)))
    memory, decode_rate = ours_in_memory(train, a.size, a, device)
    rows.append(("ours, memory: the one-time decoding into memory", decode_rate))
    rows.append(("ours, memory: every later epoch, batched crops only", _timed(memory, device, a.passes)))
    for name, rate in decoding_rates(train):
        rows.append((f"decoding alone, one process: {name}", rate))
    data = {"images": len(train), "data_dir": a.data_dir, "size": a.size, "batch_size": a.batch_size,
            "workers": a.workers, "device": str(device), "passes": a.passes, "decoder": common.jpeg_decoder(),
            "rows": [list(row) for row in rows]}
    print(table(data) + "\n" + provenance(started), flush=True)
    if a.result:
        given = "python benchmarks/data_pipeline.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        save_result(a.result, "data_pipeline", given, ["common.py", "benchmarks/data_pipeline.py"], data, started)
    return rows


def table(data: dict) -> str:
    """The markdown table of one run (its raw figures as --result keeps them)."""
    reference = data["rows"][0][1]
    lines = [f"{data['images']} training images of {data['data_dir']}, {data['size']} px crops, batch "
             f"{data['batch_size']}, {data['workers']} workers, device {data['device']}, {data['passes']} passes.", "",
             "| pipeline | images/s | ratio to torchvision |", "|---|---|---|"]
    lines += [f"| {name} | {rate:.0f} | {rate / reference:.2f} |" if rate is not None else f"| {name} | not installed | |"
              for name, rate in data["rows"]]
    return "\n".join(lines + ["", f"common.read_image decodes JPEG and PNG with {data['decoder']} here."]) + "\n"


if __name__ == "__main__":
    common.cli(main)
