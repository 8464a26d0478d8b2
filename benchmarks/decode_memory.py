"""Memory of an image folder kept in memory: the decoded images at the default load size
against full resolution, and under torchrun one copy per machine, mapped by every process,
against every process decoding its own.

    python benchmarks/decode_memory.py --data-dir DAVIS_DIR/JPEGImages/480p --result results/decode-memory.json
    torchrun --standalone --nproc_per_node=2 benchmarks/decode_memory.py --data-dir DIR --own-copy   # one setting

Without torchrun it runs every setting itself (the torchrun ones as `python -m
torch.distributed.run --standalone --nproc_per_node=--processes`) and prints one table.
Each process loads the folder as a method does (common.load_image_data) and reports its
resident memory (RSS) and its proportional share (PSS: a page mapped by two processes
counts half in each) before and after touching every image, and the size of the decoded
images. Linux only (/proc/self/smaps_rollup).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from registry import provenance, save_result  # noqa: E402


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"]}


def load(a) -> dict:
    """Load the folder as a method does, touch every image; this process's memory before and after."""
    warnings.simplefilter("ignore", DeprecationWarning)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not a.own_copy
    if distributed:
        dist.init_process_group("gloo")
    args = common.parse_args(common.Args, ["--dataset", "folder", "--data-dir", a.data_dir, "--image-size",
                                           str(a.image_size), "--workers", "0",
                                           *(["--load-size", str(a.load_size)] if a.load_size else [])])
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
    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "decoded_mb": decoded / 2 ** 20, "load_side": common.load_side(args),
              "rss_before": before["rss"], "rss_after": after["rss"], "pss_before": before["pss"], "pss_after": after["pss"]}
    print(f"rank {rank}: decoded images {report['decoded_mb']:.0f} MB; RSS {before['rss']:.0f} -> {after['rss']:.0f} MB, "
          f"PSS {before['pss']:.0f} -> {after['pss']:.0f} MB "
          f"({'one copy per machine, mapped' if distributed else 'its own copy'})", flush=True)
    if a.report:
        Path(a.report, f"rank{rank}.json").write_text(json.dumps(report))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return report


def setting(a, processes: int, load_size: int, own_copy: bool) -> list[dict]:
    """One setting in fresh processes (python alone, or torchrun): each rank's report."""
    with tempfile.TemporaryDirectory() as tmp:
        launch = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [*launch, __file__, "--data-dir", a.data_dir, "--image-size", str(a.image_size),
                   "--load-size", str(load_size), "--report", tmp, *(["--own-copy"] if own_copy else [])]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            common.fail(f"decode_memory: {' '.join(command)} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(processes)]


def table(data: dict) -> str:
    """The decoded sizes, then the memory each process adds under torchrun, one copy against one each."""
    default, full = data["default"], data["full"]
    lines = [f"{data['images']} images of {data['data_dir']} at --image-size {data['image_size']}: decoded and kept "
             f"at the default load size ({default['load_side']} px on the shorter side) {default['decoded_mb']:.0f} MB, "
             f"at --load-size {full['load_side']} {full['decoded_mb']:.0f} MB.", "",
             f"Memory added by loading them at --load-size {full['load_side']} under torchrun, {data['processes']} "
             f"processes, as PSS after touching every image:", "",
             "| | " + " | ".join(f"rank {r}" for r in range(data["processes"])) + " | all |",
             "|---" * (data["processes"] + 2) + "|"]
    for label, key in (("decoded once per machine, mapped by every process (what the methods do)", "shared"),
                       ("each process decodes its own copy", "own_copy")):
        added = [r["pss_after"] - r["pss_before"] for r in sorted(data[key], key=lambda r: r["rank"])]
        lines.append(f"| {label} | " + " | ".join(f"+{m:.0f} MB" for m in added) + f" | +{sum(added):.0f} MB |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--load-size", type=int, default=0, help="shorter side kept for training (large: more memory); "
                                                            "without torchrun: the full-resolution setting (default 480)")
    p.add_argument("--own-copy", action="store_true", help="every process decodes its own copy (no process group)")
    p.add_argument("--processes", type=int, default=2, help="without torchrun: processes of the torchrun settings")
    p.add_argument("--result", help="also keep the raw figures here (results/<name>.json, for benchmarks/report.py)")
    p.add_argument("--report", help=argparse.SUPPRESS)  # internal: the folder where each rank writes its figures
    a = p.parse_args(argv)
    if "WORLD_SIZE" in os.environ or a.report:
        return load(a)
    started = time.time()
    full = a.load_size or 480
    default, = setting(a, 1, 0, False)
    whole, = setting(a, 1, full, False)
    _, train, test, _ = common.folder_splits(Path(a.data_dir))
    data = {"data_dir": a.data_dir, "image_size": a.image_size, "processes": a.processes, "images": len(train) + len(test),
            "default": default, "full": whole,
            "shared": setting(a, a.processes, full, False), "own_copy": setting(a, a.processes, full, True)}
    print(table(data) + "\n" + provenance(started), flush=True)
    if a.result:
        given = "python benchmarks/decode_memory.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        save_result(a.result, "decode_memory", given, ["common.py", "benchmarks/decode_memory.py"], data, started)
    return data


if __name__ == "__main__":
    common.cli(main)
