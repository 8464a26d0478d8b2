"""The lecture's question in numbers: every method on the same data, backbone and budget,
evaluated with the common protocol, in one markdown table.

    python benchmarks/compare.py                          # built-in data, each method's default budget
    python benchmarks/compare.py --methods rotation simclr --epochs 1
    python benchmarks/compare.py --dataset folder --data-dir data/cifar10-jpg --epochs 2 \\
        --davis-dir data/davis2016-sample --out runs/compare-cifar

Each method runs as its own script (`python <method>.py ...`) in a subprocess: the
table measures the committed code, a method that fails is reported as failed while
the rest still run, and the peak memory is that method's own (resident set on the
CPU, allocated memory on a GPU). Every figure is read from the run's eval.json.
The image methods share the dataset, backbone, epochs or steps and, with
--image-size, the image size (otherwise each uses its default: patch location needs
80 px for its grid, jigsaw 64 px for its puzzle). Video colorization trains on videos (the
built-in ones, or --davis-dir) and gets its own table, with region similarity J.
Output: <out>/table.md, <out>/results.json (each run's eval.json and its kNN learning
curve), and each run in <out>/<method>/. Run again with the same --out and options, it
reads back the runs that finished and continues a stopped one from its checkpoint; a
folder that holds runs of other options is refused.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

from registry import METHODS, provenance, run_script, save_result  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"which methods, in this order (default: all: {' '.join(METHODS)})")
    p.add_argument("--dataset", default="shapes", help="shapes | cifar10 | cifar100 | stl10 | folder (image methods)")
    p.add_argument("--data-dir", default="", help="passed to every image method as --data-dir")
    p.add_argument("--davis-dir", default="", help="DAVIS-layout folder for video colorization "
                                                   "(default: the built-in videos when --dataset is shapes)")
    p.add_argument("--backbone", default="small", help="small | resnet18 | resnet50, for every method")
    p.add_argument("--image-size", type=int, default=0, help="one image size for every method (0: each its default)")
    p.add_argument("--epochs", type=int, default=0, help="epochs for every method (0: each its default)")
    p.add_argument("--max-steps", type=int, default=0, help="stop every method after this many steps (0: no limit)")
    p.add_argument("--extra", default="", help="more options for every method, e.g. '--batch-size 64 --workers 0'")
    p.add_argument("--out", default="", help="folder for the runs and the table (default: runs/compare-<date>-<time>)")
    p.add_argument("--result", default="", help="also keep the raw result here (results/<name>.json, which "
                                                "benchmarks/report.py renders into the docs)")
    p.add_argument("--timeout", type=float, default=0, help="seconds before a method is stopped and reported failed "
                                                           "(0: none)")
    return p.parse_args(argv)


def command(method: str, a) -> list[str] | str:
    """The method's options, or a string saying why it cannot run."""
    argv = ["--backbone", a.backbone, "--log-every", "30"]
    if method == "video_colorization":
        if a.davis_dir:
            argv += ["--dataset", "davis", "--data-dir", a.davis_dir]
        elif a.dataset != "shapes":
            return "skipped: give --davis-dir (videos) for a dataset other than the built-in one"
    else:
        argv += ["--dataset", a.dataset] + (["--data-dir", a.data_dir] if a.data_dir else [])
    if a.image_size:
        argv += ["--image-size", str(a.image_size)]
    if a.epochs:
        argv += ["--epochs", str(a.epochs)]
    if a.max_steps:
        argv += ["--max-steps", str(a.max_steps)]
    return argv + a.extra.split()


def run_method(method: str, a, out: Path, earlier: dict) -> dict:
    """Run one method's script; its eval.json plus wall time, peak memory and status. `earlier`:
    the rows of an earlier, stopped compare into the same folder, by method."""
    argv = command(method, a)
    if isinstance(argv, str):
        return {"method": method, "status": argv}
    run = out / method
    said, said_command = out / f"{method}.command", " ".join([f"{method}.py", *argv])
    if said.is_file() and said.read_text() != said_command:  # another compare's run: never mixed into this one
        common.fail(f"{run} holds a run of another compare ({said.read_text()}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    said.write_text(said_command)
    if (run / "eval.json").is_file() and earlier.get(method, {}).get("status") == "ok":
        print(f"[compare] {method}: already run, reading its row of {out / 'results.json'}", flush=True)
        return earlier[method]  # finished in an earlier, stopped compare: its figures, time and memory
    # A run stopped midway goes on from its checkpoint, with its own options (its time: this sitting's);
    # one that finished but was never tabulated is only evaluated again.
    go = ["--resume", str(run)] if (run / "checkpoint.pt").is_file() else argv
    print(f"[compare] {method}: {method}.py {' '.join(go)} --out {run}", flush=True)
    return {**run_script(method, go, run, out / f"{method}.log", a.timeout), **learning_curve(run)}


def learning_curve(run: Path) -> dict:
    """The kNN monitor of the run (log.jsonl) as [share of training done, kNN] pairs, kept
    with the figures so that the curve survives the run folder."""
    if not (run / "log.jsonl").is_file() or not (run / "config.json").is_file():
        return {}
    epochs = json.loads((run / "config.json").read_text())["epochs"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {"knn_curve": [[r["epoch"] / epochs, r["knn_top1"]] for r in records if "knn_top1" in r and "event" not in r]}


def _pretext(r: dict) -> str:
    """Every pretext_* figure of the run's eval.json, named by the rest of its key."""
    return ", ".join(f"{key[len('pretext_'):].replace('_', ' ')} {value:.3g}" for key, value in r.items()
                     if key.startswith("pretext_"))


def _cost(r: dict) -> list[str]:
    memory = f"{r['peak_gpu_memory_mb']:.0f} MB GPU" if "peak_gpu_memory_mb" in r else f"{r['peak_rss_mb']:.0f} MB RSS"
    return [f"{r.get('train_images_per_s', 0):.0f}", f"{r['wall_s']:.0f} s", memory]


def table(rows: list[dict], a, started: float | None = None) -> str:
    size = f"{a.image_size} px" if a.image_size else "each method's default size"
    budget = (f"{a.epochs} epochs" if a.epochs else "each method's default epochs") + \
        (f", at most {a.max_steps} steps" if a.max_steps else "")
    images = [r for r in rows if r["method"] != "video_colorization"]
    data = f"dataset {a.dataset}{' (' + a.data_dir + ')' if a.data_dir else ''}" if images else ""
    ran = any(r["method"] == "video_colorization" and r["status"] == "ok" for r in rows)
    videos = (f"videos of {a.davis_dir}" if a.davis_dir else "the built-in videos") if ran else ""
    lines = [f"{', '.join(filter(None, (data, videos))).capitalize()}, backbone {a.backbone}, {size}, "
             f"{budget}{', ' + a.extra if a.extra else ''}.", ""]
    if images:
        lines += ["| method | pretext | kNN | kNN random init | linear | linear random init | gain kNN / linear "
                  "| train images/s | wall time | peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    video = []
    for r in rows:
        if r["method"] == "video_colorization":
            video.append(r)
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} |  |  |  |  |  |  |  |  |")
            continue
        gain = f"{r['knn_top1'] - r['random_knn_top1']:+.3f} / {r['linear_top1'] - r['random_linear_top1']:+.3f}"
        lines.append("| " + " | ".join([r["method"], _pretext(r), f"{r['knn_top1']:.3f}", f"{r['random_knn_top1']:.3f}",
                                        f"{r['linear_top1']:.3f}", f"{r['random_linear_top1']:.3f}", gain,
                                        *_cost(r)]) + " |")
    if video:
        lines += ([""] if images else []) + [
            "| method | colour accuracy | J | J random init | J first mask copied | gain over random init "
            "| train clips/s | wall time | peak memory |", "|---|---|---|---|---|---|---|---|---|"]
        for r in video:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['status']} |  |  |  |  |  |  |  |")
                continue
            if r["J"] is None:  # videos annotated on the first frame only
                lines.append(f"| {r['method']} ({r['videos']} videos) | {r['pretext_top1']:.3f} | not scored "
                             f"(first-frame masks only) |  |  |  | " + " | ".join(_cost(r)) + " |")
                continue
            lines.append("| " + " | ".join([
                f"{r['method']} ({r['videos']} videos, {r['objects']} objects)", f"{r['pretext_top1']:.3f}",
                f"{r['J']:.3f}", f"{r['J_random_init']:.3f}", f"{r['J_copy_first']:.3f}",
                f"{r['J'] - r['J_random_init']:+.3f}", *_cost(r)]) + " |")
    if started is not None:
        lines += ["", provenance(started)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    a = parse(argv)
    out = Path(a.out or f"runs/compare-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # read before the first row is written over them: a stopped compare's finished runs are kept
    earlier = {r["method"]: r for r in json.loads((out / "results.json").read_text())} \
        if (out / "results.json").is_file() else {}
    rows = []
    for method in a.methods:
        rows.append(run_method(method, a, out, earlier))
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")  # kept if stopped midway
        print(f"[compare] {method}: {rows[-1]['status']}", flush=True)
    text = table(rows, a, started)
    (out / "table.md").write_text(text)
    print(text, flush=True)
    if a.result:
        given = "python benchmarks/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        options = {k: v for k, v in vars(a).items() if k not in ("out", "result", "timeout")}
        save_result(a.result, "compare", given, code_of(a.methods), {"options": options, "rows": rows}, started)
    return rows


def code_of(methods) -> list[str]:
    """The code a compare table measures: the methods' files, common.py, the built-in data, this."""
    return [f"{m}.py" for m in methods] + ["common.py", "builtin_data.py", "benchmarks/compare.py"]


if __name__ == "__main__":
    common.cli(main)
