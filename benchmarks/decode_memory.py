"""Memory of an image folder kept in memory, under torchrun: decoded once per machine and
mapped by every process, against every process decoding its own copy.

    torchrun --standalone --nproc_per_node=2 benchmarks/decode_memory.py --data-dir /tmp/davisfolder
    torchrun --standalone --nproc_per_node=2 benchmarks/decode_memory.py --data-dir /tmp/davisfolder --own-copy

Each process loads the folder as a method does (common.load_image_data) and prints its
resident memory (RSS) and its proportional share (PSS: a page mapped by two processes
counts half in each) before and after, and the size of the decoded images. Linux only
(/proc/self/smaps_rollup).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import warnings
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--load-size", type=int, default=480, help="shorter side kept for training (large: more memory)")
    p.add_argument("--own-copy", action="store_true", help="every process decodes its own copy (no process group)")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not a.own_copy
    if distributed:
        dist.init_process_group("gloo")
    args = common.parse_args(common.Args, ["--dataset", "folder", "--data-dir", a.data_dir, "--image-size",
                                           str(a.image_size), "--load-size", str(a.load_size), "--workers", "0"])
    before = memory_mb()
    data = common.load_image_data(args)
    pretrain = data.pretrain
    tensors = [d.images for d in (data.train, data.test)] + \
        ([pretrain.flat] if isinstance(pretrain, common.RaggedImages) else [])
    decoded = sum(t.numel() for t in tensors)
    sum(int(t.sum()) for t in tensors)  # touch every page, as training does: mapped pages count once read
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand decoding's freed scratch memory back, so RSS is what stays
    after = memory_mb()
    if distributed:
        dist.barrier()  # every process has mapped the data before any reports (and before any leaves)
    rank = os.environ.get("RANK", "0")
    print(f"rank {rank}: decoded images {decoded / 2 ** 20:.0f} MB; RSS {before['rss']:.0f} -> {after['rss']:.0f} MB, "
          f"PSS {before['pss']:.0f} -> {after['pss']:.0f} MB "
          f"({'one copy per machine, mapped' if distributed else 'its own copy'})", flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    common.cli(main)
