"""The docs' results, generated from the raw results in results/.

    python benchmarks/report.py            # rewrite every generated block from results/
    python benchmarks/report.py --check    # exit 1 if a committed file differs from what it would write (CI)

A benchmark run with `--result results/<name>.json` keeps its raw result there: every
figure, the command, the code it measured (each file's sha256) and its provenance line
(registry.save_result). In RESULTS.md, README.md and docs/*.md a generated block is

    <!-- report: <name> -->
    ... (written by this script: never edit by hand) ...
    <!-- /report -->

and holds the command, the table the benchmark's own table function makes from the raw
result, and its provenance line. When a file of the code it measured has changed since, the
block says so first: the table is stale until the command is run again. Nothing here runs
a benchmark, reads the git history or the clock: the same results/ and code give the same
text on every machine.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registry import ROOT, code_hashes  # noqa: E402

RESULTS = ROOT / "results"
BLOCK = re.compile(r"(<!-- report: ([\w.-]+) -->\n)(.*?)(<!-- /report -->)", re.S)


def render_unseen_videos(data) -> str:
    import unseen_videos
    return unseen_videos.table(data, None)


def render_official_curve(data) -> str:
    import official_curve
    return official_curve.table(data["epochs"], data["random_init"], data["seconds"], None)


def render_compare(data) -> str:
    import compare
    defaults = vars(compare.parse([]))
    return compare.table(data["rows"], argparse.Namespace(**{**defaults, **data["options"]}), None)


def render_claim(data) -> str:
    import claims
    return claims.render(data)


def render_efficiency(data) -> str:
    import efficiency
    return efficiency.table(data)


RENDER = {"efficiency": render_efficiency, "unseen_videos": render_unseen_videos, "official_curve": render_official_curve, "compare": render_compare,
          "claim": render_claim}


def stale_files(record: dict) -> list[str]:
    """The files of the measured code that are not as they were when it was measured."""
    now = code_hashes([f for f in record["code"] if (ROOT / f).is_file()])
    return [f for f, digest in record["code"].items() if now.get(f) != digest]


def render(name: str) -> str:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return f"Not measured yet: results/{name}.json is missing.\n"
    record = json.loads(path.read_text())
    lines = []
    changed = stale_files(record)
    if changed:
        lines += [f"**Stale:** {', '.join(f'`{f}`' for f in changed)} changed after this was measured; "
                  f"the figures below are of the earlier code until the command is run again.", ""]
    lines += ["    " + record["command"], ""]
    table = RENDER[record["kind"]](record["data"]).rstrip("\n")
    return "\n".join(lines) + "\n" + table + "\n\n" + record["provenance"] + "\n"


def generated(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)


def targets() -> list[Path]:
    return [ROOT / "RESULTS.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each file that differs")
    a = p.parse_args(argv)
    differ = []
    for path in targets():
        text = path.read_text()
        new = generated(text)
        if new != text:
            differ.append(str(path.relative_to(ROOT)))
            if not a.check:
                path.write_text(new)
    if a.check and differ:
        print(f"error: generated results differ from results/ in {', '.join(differ)}: "
              f"run python benchmarks/report.py", file=sys.stderr)
        raise SystemExit(1)
    print(f"{'would rewrite' if a.check else 'rewrote'}: {', '.join(differ) or 'nothing'}")
    return differ


if __name__ == "__main__":
    main()
