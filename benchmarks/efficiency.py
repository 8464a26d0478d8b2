"""Where the time goes: each method's training throughput against its bare backbone's.

    python benchmarks/efficiency.py                      # all nine methods, built-in data, ~5 min on 2 CPU cores
    python benchmarks/efficiency.py --methods jigsaw moco --steps 30
    python benchmarks/efficiency.py --device cuda --backbone resnet18   # on a GPU (bf16, channels_last as the methods)
    python benchmarks/efficiency.py --methods colorization --profile    # and where a step's time goes, by operator

For every method, in one process and one after the other:
  1. the method's own main() for --steps optimiser steps (no evaluation), its
     training images/s read from eval.json (source images: one per image, however
     many views, tiles or patches the pretext task makes of it);
  2. the bare backbone, forward and backward with SGD, on the tensors the pretext
     task feeds it per step: 4 rotations, 2 patches, 9 tiles, 2 views (MoCo: the key
     view forward only), 4 frames of a clip, and so on, at each method's default sizes.
The ratio method / bare is the share of the time spent in the backbone. Well below 1
means the pretext data, heads, losses or bookkeeping cost time worth a look;
--profile then says which operators take it (torch.profiler, CPU self time).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from registry import METHODS  # noqa: E402


def bare_workload(method: str, args) -> tuple[list[tuple[int, int, bool]], bool, int]:
    """What the backbone sees per step: [(images, side, with backward)], half width, image_size for the
    backbone's stem choice. Sizes come from the method's own defaults."""
    b, s = args.batch_size, args.image_size
    if method == "rotation":
        return [(args.angles * b, s, True)], False, s
    if method == "patch_location":
        return [(2 * b, args.patch, True)], False, args.patch
    if method == "jigsaw":
        return [(9 * b, args.tile, True)], False, args.tile
    if method in ("inpainting", "colorization"):
        return [(b, s, True)], False, s
    if method == "split_brain":
        return [(b, s, True), (b, s, True)], True, s  # two half-width networks, one image each
    if method == "video_colorization":
        return [((args.ref_frames + 1) * b, args.crop or s, True)], False, s
    if method == "simclr":
        return [(2 * b, s, True)], False, s
    if method == "moco":
        return [(b, s, True), (b, s, False)], False, s  # queries learn; keys only go forward
    raise ValueError(method)


def bare_throughput(method: str, args, device, steps: int) -> float:
    """Source images per second of forward + backward + SGD on the backbone alone."""
    work, half, stem_size = bare_workload(method, args)
    layout = torch.channels_last if common.uses_channels_last(device) else torch.contiguous_format
    nets = []
    for _ in work if half else work[:1]:
        net, _ = common.build_backbone(args.backbone, stem_size, half=half)
        if method == "video_colorization":
            import video_colorization
            net = video_colorization.dense(net)
        nets.append(net.to(device).to(memory_format=layout).train())
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    batches = [torch.rand(n, 3, side, side, device=device).contiguous(memory_format=layout)
               for n, side, _ in work]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        loss = 0
        for k, (x, (_, _, grad)) in enumerate(zip(batches, work)):
            net = nets[k if half else 0]
            with amp, torch.set_grad_enabled(grad):
                out = (common.feature_map(net, x) if method == "video_colorization" else net(x)).float().mean()
            loss = loss + out if grad else loss
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: allocations, cuDNN autotuning
        step()
    _sync(device)
    start = time.time()
    for _ in range(steps):
        step()
    _sync(device)
    return args.batch_size * steps / (time.time() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_throughput(method: str, argv: list[str], steps: int) -> float:
    module = importlib.import_module(method)
    with tempfile.TemporaryDirectory() as out:
        module.main([*argv, "--max-steps", str(steps), "--no-eval", "--log-every", "1000", "--out", out])
        return json.loads((Path(out) / "eval.json").read_text())["train_images_per_s"]


WARM = 3  # steps before the profiled ones: allocations and caches settle


def profile_steps(method: str, argv: list[str], steps: int, top: int = 12) -> list[str]:
    """Markdown rows: the operators that take a training step's time, in ms per step.

    The profiler records `steps` training steps after WARM and nothing else (not the
    data, the model building or colorization's colour prior): the method's own loop
    marks each step through run.log, which every method calls once per step. Self
    time: an operator's own time, not its callees'."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=WARM, warmup=1, active=steps, repeat=1)) \
            as prof:
        log = common.Run.log

        def log_and_step(self, *a, **k):
            prof.step()
            return log(self, *a, **k)

        common.Run.log = log_and_step
        try:
            method_throughput(method, argv, WARM + 1 + steps)  # the last step's run.log closes the window
        finally:
            common.Run.log = log
    # us -> ms; a step's own range (ProfilerStep#n) keeps the time no operator covers: Python
    per_step = {("(Python, outside operators)" if e.key.startswith("ProfilerStep") else e.key):
                e.self_cpu_time_total / steps / 1000 for e in prof.key_averages()}
    total = sum(per_step.values())
    rows = [f"| {method} | all operators | {total:.1f} | 1.00 |"]
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"| | {name} | {ms:.1f} | {ms / total:.2f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    p.add_argument("--steps", type=int, default=20, help="timed steps for each method and each bare backbone")
    p.add_argument("--backbone", default="small")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true",
                   help="also break each method's step down by operator (one more, profiled run per method)")
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    a = p.parse_args(argv)
    device = common.pick_device(a.device)
    lines = [f"Backbone {a.backbone}, device {device}, {a.steps} steps each, each method's default "
             f"sizes and batch, built-in data.", "",
             "| method | backbone sees per step | method images/s | bare backbone images/s | ratio |",
             "|---|---|---|---|---|"]
    for method in a.methods:
        module = importlib.import_module(method)
        argv = ["--backbone", a.backbone, "--device", a.device]
        args = common.parse_args(module.Args, argv)
        fed = " + ".join(f"{n} x {side} px{'' if grad else ' (forward only)'}"
                         for n, side, grad in bare_workload(method, args)[0])
        bare = bare_throughput(method, args, device, a.steps)
        ours = method_throughput(method, argv, a.steps)
        lines.append(f"| {method} | {fed} | {ours:.0f} | {bare:.0f} | {ours / bare:.2f} |")
        print(lines[-1], flush=True)
    if a.profile:
        lines += ["", f"Per step, by operator (CPU self time under torch.profiler, which adds its own overhead; "
                  f"{a.steps} steps):", "", "| method | operator | ms per step | share |", "|---|---|---|---|"]
        for method in a.methods:
            rows = profile_steps(method, ["--backbone", a.backbone, "--device", a.device], a.steps)
            lines += rows
            print("\n".join(rows), flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(text)
    return text


if __name__ == "__main__":
    common.cli(main)
