"""The methods, in the lecture's order: the one list every benchmark reads.

    python benchmarks/registry.py          # print them

A method is its script, `<name>.py` at the top of the repository, run by its
command line as a user would: run_script() here (compare.py, claims.py). Only
efficiency.py calls a method's main(argv) (same arguments) in its own process,
because its forward hooks must sit inside the run they measure.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMAGE_METHODS = ("rotation", "patch_location", "jigsaw", "inpainting", "colorization", "split_brain", "simclr",
                 "moco")  # evaluated with kNN and the linear probe on images
METHODS = IMAGE_METHODS[:6] + ("video_colorization",) + IMAGE_METHODS[6:]  # lecture order; videos scored by J


def run_script(method: str, argv: list[str], out: Path, log: Path, timeout: float = 0) -> dict:
    """`python <method>.py ARGV --out OUT` in a subprocess, its output in `log`: the run's
    eval.json plus wall_s, peak_rss_mb (the child's own peak resident set) and status
    ("ok", or "failed ..." with the method's last line). A run stopped by a signal passes
    the signal on (the method saves its checkpoint) and re-raises."""
    command = [sys.executable, str(ROOT / f"{method}.py"), *argv, "--out", str(out)]
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            _, status, usage = _wait(proc, timeout)  # wait4: this child's own resource usage
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"method": method, "status": f"failed: stopped after --timeout {timeout:g} s (see {log})",
                    "wall_s": time.time() - start}
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    row = {"method": method, "wall_s": time.time() - start, "peak_rss_mb": usage.ru_maxrss / 1024}
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not (out / "eval.json").is_file():
        lines = log.read_text(errors="replace").strip().splitlines()
        return {**row, "status": f"failed (exit {code}): {lines[-1] if lines else 'no output'}"}
    return {**row, **json.loads((out / "eval.json").read_text()), "status": "ok"}


def _wait(proc, timeout: float):
    if not timeout:
        return os.wait4(proc.pid, 0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        time.sleep(0.5)
    raise subprocess.TimeoutExpired(proc.args, timeout)


def provenance(started: float) -> str:
    """One line that says what made a table: the commit of the code (and whether the tree had
    changes to the code beside it), date, torch version, the machine's processor or GPU, threads, wall time."""
    import datetime
    import platform
    import torch
    git = ["git", "-C", str(ROOT)]
    # The code that makes the figures: the method files, common.py, the benchmarks. The commit
    # named is the last to change it, so that commits of docs or tests alone between tables do
    # not make tables of the same code look as if they came from different code.
    code = [":(glob)*.py", ":(glob)benchmarks/**", "requirements.txt"]
    commit = subprocess.run([*git, "log", "-1", "--format=%h", "--", *code],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", *code],
                           capture_output=True, text=True).stdout.strip()
    if torch.cuda.is_available():
        hardware = torch.cuda.get_device_name(0)
    else:
        cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
        hardware = f"{cpu[0] if cpu else platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    wall = time.time() - started
    return (f"Made by commit {commit or 'unknown'}{' with uncommitted changes to the code' if dirty else ''}, "
            f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {hardware}, "
            f"{torch.get_num_threads()} threads, {wall / 60:.0f} min wall time.")


def code_hashes(files: list[str]) -> dict[str, str]:
    """sha256 of each file of the code a table measured (paths from the repository root): a
    table is stale when any of them differs from what it was when the table was measured."""
    import hashlib
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest() for f in files}


def save_result(path: str | Path, kind: str, command: str, code: list[str], data, started: float):
    """The raw result of a benchmark, as results/<name>.json holds it: what kind of table it
    makes (benchmarks/report.py renders it), the command, the code it measured (with each
    file's hash), its provenance line, and every figure (data). Written atomically."""
    record = {"kind": kind, "command": command, "code": code_hashes(code), "provenance": provenance(started),
              "data": data}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return record


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(" ".join(METHODS))
