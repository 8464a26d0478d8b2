"""The table of benchmarks/gpu_check.sh, from its runs: images/s once warm (the median over
the steps of the second half of each run), images/s over the whole run (compilation
included), peak GPU memory, and the loss trend (the mean loss of the first and of the last
tenth of the steps), for each method with and without --compile.

    python benchmarks/gpu_table.py RUNS --steps 300 --backbone resnet18 --methods rotation moco \
        --result results/gpu-check.json

gpu_check.sh calls it with its own runs folder; --result keeps the raw figures (for
benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from registry import METHODS, provenance, save_result


def collect(out: Path, methods: list[str]) -> list[dict]:
    """One row per method and compile setting, from each run's eval.json and log.jsonl."""
    rows = []
    for m in methods:
        for compile_ in (False, True):
            run = out / f"{m}-{'compile' if compile_ else 'no-compile'}"
            row = {"method": m, "compile": compile_}
            if not (run / "eval.json").is_file():
                rows.append({**row, "status": f"failed: see {run.name}.log"})
                continue
            result = json.loads((run / "eval.json").read_text())
            lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            lines = [line for line in lines if "images_per_s" in line]
            key = next(k for k in lines[-1] if k.startswith("loss"))
            tenth = max(1, len(lines) // 10)
            rows.append({**row, "status": "ok", "loss_key": key,
                         "warm_images_per_s": statistics.median(line["images_per_s"] for line in lines[len(lines) // 2:]),
                         "images_per_s": result["train_images_per_s"],
                         "peak_gpu_memory_mb": result.get("peak_gpu_memory_mb"),
                         "loss_first": sum(line[key] for line in lines[:tenth]) / tenth,
                         "loss_last": sum(line[key] for line in lines[-tenth:]) / tenth})
    return rows


def table(data: dict) -> str:
    lines = [f"{data['gpu']}, torch {data['torch']}, backbone {data['backbone']}, built-in data at each method's size, "
             f"{data['steps']} steps, each method's default batch"
             f"{', channels_last, bf16 autocast' if data['gpu'] != 'no GPU' else ''}.", "",
             "| method | compile | images/s warm | images/s whole run | peak GPU memory | loss: first tenth -> last tenth |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['compile']} | {r['status']} |  |  |  |")
            continue
        memory = f"{r['peak_gpu_memory_mb']:.0f} MB" if r["peak_gpu_memory_mb"] is not None else "-"
        lines.append(f"| {r['method']} | {r['compile']} | {r['warm_images_per_s']:.0f} | {r['images_per_s']:.0f} | "
                     f"{memory} | {r['loss_key']} {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="gpu_check.sh's folder of runs (<method>-compile, <method>-no-compile)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--started", type=float, default=None, help="when the runs began (seconds since the epoch)")
    p.add_argument("--command", default="bash benchmarks/gpu_check.sh", help="the command the result names")
    p.add_argument("--result", help="also keep the raw figures here (results/<name>.json, for benchmarks/report.py)")
    a = p.parse_args(argv)
    import torch
    started = a.started if a.started is not None else time.time()
    data = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "torch": torch.__version__,
            "backbone": a.backbone, "steps": a.steps, "rows": collect(Path(a.runs), a.methods)}
    text = table(data) + "\n" + provenance(started) + "\n"
    (Path(a.runs) / "table.md").write_text(text)
    print(text, end="")
    if a.result:
        code = [f"{m}.py" for m in a.methods] + ["common.py", "benchmarks/gpu_check.sh", "benchmarks/gpu_table.py"]
        save_result(a.result, "gpu_check", a.command, code, data, started)
    return data


if __name__ == "__main__":
    sys.exit(main() and 0)
