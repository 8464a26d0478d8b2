"""Where the time goes: each method's training step against the networks it trains.

    python benchmarks/efficiency.py                      # all nine methods, built-in data
    python benchmarks/efficiency.py --methods moco colorization --repeats 5
    python benchmarks/efficiency.py --device cuda --backbone resnet18   # on a GPU (bf16, channels_last as the methods)
    python benchmarks/efficiency.py --methods colorization --profile    # and where a step's time goes, by operator

For every method, one after the other, --repeats times:
  1. the method's own main() with its default options, as its command line runs it
     (without the evaluation and the kNN monitor), for --steps training steps. The time of
     each step is read at run.log, which every method's loop calls once per step.
  2. In the last step, forward hooks record every network call the method's own code
     makes: each call of a module with parameters that is not made from inside another
     such call (the encoder with its head, MoCo's key encoder, inpainting's context
     encoder and discriminator, both halves of split-brain ...), with the tensors it was
     given, whether gradients were on and whether the module was in training mode.
  3. Those calls are replayed on those tensors: forward, backward from every output
     that needs a gradient, and the steps of the method's own optimizers (the kinds and
     settings it stepped in that step: Adam where it uses Adam, fused where it fuses):
     the time of the networks alone, with nothing of the method around them (no data,
     augmentation, loss, queue or logging).
ratio = the networks' time / the method's step time (medians over steps). 1.0: nothing
outside the networks costs time. The table gives the median ratio over the repeats and
its range (each repeat a fresh run). Below 0.9, --profile says which operators take the
rest outside the networks (torch.profiler, CPU self time, less the networks' own).
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from registry import METHODS, provenance, save_result  # noqa: E402

WARM = 3  # steps before the timed ones: allocations and caches settle


def _detached(value):
    """A copy of a call's arguments that the method cannot change afterwards (same layout)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class NetworkCalls:
    """Global hooks that record the outermost calls of modules with parameters, and the
    optimizers stepped (each step call, in order)."""

    def __init__(self):
        self.calls = []  # (module, args, kwargs, grad enabled, training mode, autocast on cuda)
        self.stepped = []  # the optimizers, once per step() call
        self._open = []
        self._handles = []

    def __enter__(self):
        hooks = nn.modules.module
        self._handles = [hooks.register_module_forward_pre_hook(self._pre),
                         hooks.register_module_forward_hook(self._post, with_kwargs=True, always_call=True),
                         register_optimizer_step_pre_hook(
                             lambda opt, args, kwargs: self.stepped.append(opt))]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _pre(self, module, args):
        if self._open or next(module.parameters(), None) is not None:
            self._open.append(module)

    def _post(self, module, args, kwargs, output):
        if self._open and self._open[-1] is module:
            self._open.pop()
            if not self._open:  # an outermost call: one the method's own code made
                self.calls.append((module, _detached(args), _detached(kwargs), torch.is_grad_enabled(),
                                   module.training, torch.is_autocast_enabled("cuda")))


def run_method(method: str, argv: list[str], steps: int) -> tuple[list[float], NetworkCalls]:
    """The method's main() for `steps` steps: the wall time of each step (from one run.log
    call to the next) and the network calls and optimizer steps of the last step."""
    module = importlib.import_module(method)
    stamps, recorder = [], NetworkCalls()
    log = common.Run.log

    def timed_log(self, *a, **k):
        result = log(self, *a, **k)
        stamps.append(time.perf_counter())
        if len(stamps) == steps - 1:
            recorder.__enter__()  # the last step is recorded, not timed
        elif len(stamps) == steps:
            recorder.__exit__()
        return result

    common.Run.log = timed_log
    try:
        with tempfile.TemporaryDirectory() as out:
            module.main([*argv, "--max-steps", str(steps), "--no-eval", "--monitor-every", "0",
                         "--log-every", "0", "--out", out])
    finally:
        common.Run.log = log
        recorder.__exit__()
    step_times = [b - a for a, b in zip(stamps[WARM:-2], stamps[WARM + 1:-1])]
    return step_times, recorder


def replay_optimizers(recorder: NetworkCalls) -> list:
    """Optimizers for the replay: of the kinds and settings the method stepped (its param
    groups, lr 0 so that the weights stay), one per step() call it made; SGD with momentum
    over the calls' parameters if it stepped none."""
    made = {}
    for opt in recorder.stepped:
        if id(opt) not in made:
            made[id(opt)] = type(opt)([{**group, "lr": 0.0} for group in opt.param_groups])
    if made:
        return [made[id(opt)] for opt in recorder.stepped]
    params = list({id(p): p for module, *_ in recorder.calls for p in module.parameters() if p.requires_grad}.values())
    return [torch.optim.SGD(params, lr=0.0, momentum=0.9)] if params else []


def replay_times(recorder: NetworkCalls, device, repeats: int, warm: int = WARM) -> list[float]:
    """The recorded calls replayed `repeats` times (after `warm` untimed): forward, backward,
    the method's optimizer steps (replay_optimizers)."""
    calls, optimizers = recorder.calls, replay_optimizers(recorder)

    def step():
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        outputs = []
        for module, args, kwargs, grad, training, amp in calls:
            module.train(training)
            with torch.set_grad_enabled(grad), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                outputs += [t for t in _tensors(module(*args, **kwargs)) if t.requires_grad]
        if outputs:
            sum(t.float().mean() for t in outputs).backward()
        for opt in optimizers:
            opt.step()

    times = []
    for i in range(warm + repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warm:
            times.append(time.perf_counter() - start)
    return times


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(calls: list) -> str:
    """The recorded calls, e.g. 'ContextEncoder 128x3x32x32, Discriminator 128x3x32x32 (x3)'."""
    names = []
    for module, args, _, grad, _, _ in calls:
        first = next(_tensors(args), None)
        shapes = "x".join(map(str, first.shape)) if first is not None else ""
        names.append(f"{type(module).__name__} {shapes}{'' if grad else ' (no grad)'}")
    counted = {}
    for n in names:
        counted[n] = counted.get(n, 0) + 1
    return ", ".join(n + (f" (x{c})" if c > 1 else "") for n, c in counted.items())


def measure(method: str, argv: list[str], steps: int, device) -> tuple[float, float, float, str]:
    """One repeat: (method's median step time, networks' median time, ratio, what was replayed)."""
    step_times, recorder = run_method(method, argv, steps)
    nets = replay_times(recorder, device, max(5, steps - WARM - 3))
    ours, theirs = statistics.median(step_times), statistics.median(nets)
    return ours, theirs, theirs / ours, describe(recorder.calls)


def _per_step(prof, steps: int) -> dict[str, float]:
    """ms per step of each operator's CPU self time; a step's own range (ProfilerStep#n)
    keeps the time no operator covers: Python."""
    return {("(Python, outside operators)" if e.key.startswith("ProfilerStep") else e.key):
            e.self_cpu_time_total / steps / 1000 for e in prof.key_averages()}


def profile_steps(method: str, argv: list[str], steps: int) -> tuple[dict[str, float], NetworkCalls]:
    """(ms per step of each operator in the method's training steps, the network calls and
    optimizer steps of a step).

    The profiler records `steps` training steps after WARM and nothing else (not the
    data, the model building or colorization's colour prior): the method's own loop
    marks each step through run.log, which every method calls once per step. Self
    time: an operator's own time, not its callees'."""
    from torch.profiler import ProfilerActivity, profile, schedule

    module = importlib.import_module(method)
    recorder, seen = NetworkCalls(), [0]
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=WARM, warmup=1, active=steps, repeat=1)) \
            as prof:
        log = common.Run.log

        def log_and_step(self, *a, **k):
            prof.step()
            seen[0] += 1
            if seen[0] == WARM + 1 + steps:  # the calls of the step after the profiled ones, for the replay
                recorder.__enter__()
            elif seen[0] == WARM + 2 + steps:
                recorder.__exit__()
            return log(self, *a, **k)

        common.Run.log = log_and_step
        try:
            with tempfile.TemporaryDirectory() as out:  # the last step's run.log closes the window
                module.main([*argv, "--max-steps", str(WARM + 2 + steps), "--no-eval", "--monitor-every", "0",
                             "--log-every", "0", "--out", out])
        finally:
            common.Run.log = log
            recorder.__exit__()
    return _per_step(prof, steps), recorder


def profile_replay(recorder: NetworkCalls, steps: int) -> dict[str, float]:
    """ms per step of each operator when only the networks run: the recorded calls replayed
    (forward, backward, the method's optimizer steps), as replay_times times them."""
    from torch.profiler import ProfilerActivity, profile, schedule
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=WARM, warmup=1, active=steps, repeat=1)) \
            as prof:
        for _ in range(WARM + 1 + steps):
            replay_times(recorder, torch.device("cpu"), 1, warm=0)
            prof.step()
    return _per_step(prof, steps)


def outside_rows(method: str, step: dict[str, float], networks: dict[str, float], top: int = 10) -> list[str]:
    """Markdown rows: where a step's time goes outside the networks, by operator: the step's
    time of each operator less the networks' own time of it (replayed alone), largest first."""
    total = sum(step.values())
    outside = {op: ms - networks.get(op, 0.0) for op, ms in step.items()}
    rest = sum(max(ms, 0.0) for ms in outside.values())
    rows = [f"| {method} | all, outside the networks | {rest:.1f} | {rest / total:.2f} |"]
    for op, ms in sorted(outside.items(), key=lambda kv: -kv[1])[:top]:
        if ms > 0.05:
            rows.append(f"| | {op} | {ms:.1f} | {ms / total:.2f} |")
    return rows


def table(data: dict) -> str:
    """The markdown of a measurement (data: what main() measured, as results/ keeps it)."""
    o = data["options"]
    lines = [f"Backbone {o['backbone']}, device {data['device']}, each method's default sizes and batch, built-in "
             f"data; {o['steps']} steps a run, {o['repeats']} runs a method.", "",
             "| method | networks replayed (one step) | method ms/step | networks ms/step | ratio (range) |",
             "|---|---|---|---|---|"]
    for method, m in data["methods"].items():
        ratios = sorted(m["ratios"])
        lines.append(f"| {method} | {m['networks']} | {m['method_ms']:.1f} | {m['networks_ms']:.1f} | "
                     f"{statistics.median(ratios):.2f} ({ratios[0]:.2f} to {ratios[-1]:.2f}) |")
    if data.get("profile"):
        lines += ["", f"Where a step's time goes outside the networks, by operator: each operator's CPU self time "
                  f"in the method's step less its time when the step's network calls are replayed alone "
                  f"(torch.profiler, which adds its own overhead; {o['steps']} steps). Share: of the whole step.", "",
                  "| method | operator | ms per step outside the networks | share of the step |", "|---|---|---|---|"]
        for method, (step, networks) in data["profile"].items():
            lines += outside_rows(method, step, networks)
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    p.add_argument("--steps", type=int, default=30, help="training steps of each run (the first 3 and the "
                                                         "last, recorded one are not timed)")
    p.add_argument("--repeats", type=int, default=3, help="fresh runs per method: the ratio's median and range")
    p.add_argument("--backbone", default="small")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true",
                   help="also break each method's step down by operator (one more, profiled run per method)")
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    p.add_argument("--result", default="", help="also keep the raw result here (results/<name>.json, which "
                                                "benchmarks/report.py renders into the docs)")
    a = p.parse_args(argv)
    if a.steps < WARM + 3:
        common.fail(f"--steps must be at least {WARM + 3}: {WARM} to warm up, 2 to time, 1 to record")
    device = common.pick_device(a.device)
    started = time.time()
    data = {"options": {k: getattr(a, k) for k in ("methods", "steps", "repeats", "backbone", "device", "profile")},
            "device": str(device), "methods": {}, "profile": {}}
    for method in a.methods:
        argv_run = ["--backbone", a.backbone, "--device", a.device]
        runs = [measure(method, argv_run, a.steps, device) for _ in range(a.repeats)]
        data["methods"][method] = {"networks": runs[-1][3], "method_ms": 1000 * statistics.median(r[0] for r in runs),
                                   "networks_ms": 1000 * statistics.median(r[1] for r in runs),
                                   "ratios": [r[2] for r in runs]}
        print(f"[efficiency] {method}: ratio {statistics.median(r[2] for r in runs):.2f}", flush=True)
    if a.profile:
        for method in a.methods:
            step, recorder = profile_steps(method, ["--backbone", a.backbone, "--device", a.device], a.steps)
            data["profile"][method] = (step, profile_replay(recorder, a.steps))
            print("\n".join(outside_rows(method, *data["profile"][method])), flush=True)
    text = table(data) + "\n" + provenance(started) + "\n"
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(text)
    if a.result:
        given = "python benchmarks/efficiency.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        code = [f"{m}.py" for m in a.methods] + ["common.py", "builtin_data.py", "benchmarks/efficiency.py"]
        save_result(a.result, "efficiency", given, code, data, started)
    return text


if __name__ == "__main__":
    common.cli(main)
