"""Whether a change to the code leaves every method's training as it was, bit for bit.

    python benchmarks/same_steps.py --before REV                      # check, write nothing
    python benchmarks/same_steps.py --before REV --record --why TEXT --results NAME...

A result in results/ is stale once a file of the code it measured changes (report.py
compares each file's sha256). Some changes cannot move a figure: a fix to how several
processes agree to stop leaves a one-process run as it was. This script shows it rather than
saying it: it checks out REV (a temporary `git worktree`) beside the current tree, and runs
every method on the built-in data in one process at both, --steps steps, stopped halfway by
--max-steps and continued with --resume (the checkpoint path), each saving a checkpoint
after every step; then it compares every tensor of the two final checkpoints (weights,
optimiser state, queues, random states). It prints one line a method and exits 1 when any
differs or fails.

With --record, when every method is equal, it adds to results/unaffected.json one entry per
code file that differs between REV and the current tree: the file's sha256 at both, why the
change leaves the figures as they are (--why), the results it vouches for (--results) and
this check's own line. report.py then reads a result measured at REV's file as measured at
the current one, and RESULTS.md lists each such entry. Speed is not checked: vouch only for
results whose figures are accuracies, or for a change that adds no work to a step.

A file whose code is the same but for comments and docstrings (its syntax trees compared)
needs no training: when no file changed more than that, none runs. A benchmark's own code
changed beyond that cannot be vouched for here (training the methods does not run it).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry import METHODS, ROOT, code_hashes  # noqa: E402

UNAFFECTED = ROOT / "results" / "unaffected.json"


def tensors(state, prefix=""):
    """(name, tensor) for every tensor in a nested checkpoint."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensors(v, f"{prefix}.{i}")


def train(tree: Path, method: str, out: Path, steps: int, log: Path) -> dict:
    """`method` at `tree` for `steps` steps in two sittings; its final checkpoint's tensors."""
    base = [sys.executable, str(tree / f"{method}.py"), "--save-every", "1e-9", "--no-eval", "--log-every", "1000"]
    with open(log, "a") as f:
        for argv in ([*base, "--out", str(out), "--max-steps", str(steps // 2)],
                     [*base, "--resume", str(out), "--max-steps", str(steps)]):
            if subprocess.run(argv, cwd=tree, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"{method} failed at {tree.name}: see {log}")
    return dict(tensors(torch.load(out / "checkpoint.pt", weights_only=True)))


def compare(before: dict, after: dict) -> str:
    if before.keys() != after.keys():
        return f"different parts ({len(before)} against {len(after)} tensors)"
    differ = [k for k in before if not torch.equal(before[k], after[k])]
    if differ:
        return f"{len(differ)} of {len(before)} tensors differ: {differ[:3]}"
    return f"{len(before)} tensors equal"


def changed_files(rev: str) -> list[str]:
    """The code files (top-level *.py, benchmarks/*.py) that differ between REV and the tree."""
    return subprocess.run(["git", "-C", str(ROOT), "diff", "--name-only", rev, "--", ":(glob)*.py",
                           ":(glob)benchmarks/*.py"], capture_output=True, text=True, check=True).stdout.split()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, metavar="REV", help="the commit the results were measured at")
    p.add_argument("--steps", type=int, default=16, help="steps a method trains (stopped and resumed halfway)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    p.add_argument("--record", action="store_true", help="add the entries to results/unaffected.json if all are equal")
    p.add_argument("--why", default="", help="with --record: why the change leaves the figures as they are")
    p.add_argument("--results", nargs="+", default=[], metavar="NAME",
                   help="with --record: the results/NAME.json this vouches for")
    a = p.parse_args(argv)
    if a.record and (not a.why or not a.results or a.methods != list(METHODS)):
        p.error("--record needs --why, --results and every method")
    if a.steps < 2:
        p.error("--steps must be at least 2 (it stops halfway)")
    return a


def without_docstrings(source: str) -> str:
    """The code's syntax tree with every docstring left out (comments are not in it)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def git_show(rev: str, path: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, check=True).stdout


def main(argv=None):
    a = parse(argv)
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", a.before + "^{commit}"],
                      capture_output=True).returncode != 0:
        raise SystemExit(f"error: --before {a.before}: no such commit")
    a.before = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.before + "^{commit}"],
                              capture_output=True, text=True, check=True).stdout.strip()  # HEAD~1 means nothing later
    files = changed_files(a.before)
    print(f"code that differs from {a.before}: {', '.join(files) or 'none'}", flush=True)
    docs_only = {f: without_docstrings(git_show(a.before, f).decode()) == without_docstrings((ROOT / f).read_text())
                 for f in files}
    for f in files:
        print(f"{f}: {'the same code but for comments and docstrings' if docs_only[f] else 'its code changed'}")
    code_changed = [f for f in files if not docs_only[f]]
    unchecked = [f for f in code_changed if f.startswith("benchmarks/")]
    if unchecked:  # training the methods says nothing of a benchmark's own code
        raise SystemExit(f"error: {', '.join(unchecked)}: code changed that training the methods does not check")
    equal = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if code_changed:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tmp / "before"),
                            a.before], check=True)
        try:
            for method in a.methods if code_changed else []:
                try:
                    result = compare(*(train(tree, method, tmp / f"{method}-{tree.name}", a.steps, tmp / "log.txt")
                                       for tree in (tmp / "before", ROOT)))
                except RuntimeError as e:
                    print((tmp / "log.txt").read_text()[-3000:], file=sys.stderr)
                    result = str(e)
                equal &= result.endswith("tensors equal")
                print(f"{method}: {result}", flush=True)
        finally:
            if code_changed:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                               check=False)
    if not equal:
        raise SystemExit(1)
    if a.record:
        measured = set()
        for name in a.results:
            path = ROOT / "results" / f"{name}.json"
            if not path.is_file():
                raise SystemExit(f"error: --results {name}: results/{name}.json missing")
            measured |= set(json.loads(path.read_text())["code"])
        files = [f for f in files if f in measured]  # a change to code no such result measured needs no entry
        now = code_hashes(files)
        entries = json.loads(UNAFFECTED.read_text()) if UNAFFECTED.is_file() else []
        command = f"python benchmarks/same_steps.py --before {a.before}{f' --steps {a.steps}' if code_changed else ''}"
        for f in files:
            how = ("the same code but for comments and docstrings" if docs_only[f] else
                   f"every method's checkpoint after {a.steps} steps (resumed halfway) equal in all its tensors")
            entries.append({"file": f, "from": hashlib.sha256(git_show(a.before, f)).hexdigest(), "to": now[f],
                            "why": a.why, "results": sorted(a.results),
                            "checked": f"{command}: {how}; {datetime.date.today()}, torch {torch.__version__}"})
        UNAFFECTED.write_text(json.dumps(entries, indent=1) + "\n")
        print(f"recorded in results/unaffected.json: {', '.join(files) or 'nothing (no result named measured it)'}")


if __name__ == "__main__":
    main()
