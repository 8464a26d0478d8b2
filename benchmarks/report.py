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
block says so first: the table is stale until the command is run again, unless
results/unaffected.json holds that change for that result (benchmarks/same_steps.py shows
that every method trains as before, bit for bit, and records it). Nothing here runs
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
BLOCK = re.compile(r"(<!-- report: ([\w.:-]+(?: [\w.:-]+)*) -->\n)(.*?)(<!-- /report -->)", re.S)


def render_unseen_videos(data) -> str:
    import unseen_videos
    return unseen_videos.table(data, None)


def render_official_curve(data) -> str:
    import official_curve
    return official_curve.table(data["epochs"], data["random_init"], data["seconds"], None)


def render_demo_curve(data) -> str:
    import official_curve
    return official_curve.demo_table(data["epochs"], data["random_init"], data["seconds"], None)


def render_demo_measures(data) -> str:
    import official_curve
    return official_curve.measures_table(data)


def render_compare(data) -> str:
    import compare
    defaults = vars(compare.parse([]))
    return compare.table(data["rows"], argparse.Namespace(**{**defaults, **data["options"]}), None)


def render_claim(data) -> str:
    import claims
    return claims.render(data)


def render_data_pipeline(data) -> str:
    import data_pipeline
    return data_pipeline.table(data)


def render_reference_speed(data) -> str:
    import reference_speed
    return reference_speed.table(data)


def render_decode_memory(data) -> str:
    import decode_memory
    return decode_memory.table(data)


def render_gpu_check(data) -> str:
    import gpu_table
    return gpu_table.table(data)


def render_efficiency(data) -> str:
    import efficiency
    return efficiency.table(data)


RENDER = {"compare": render_compare, "claim": render_claim, "efficiency": render_efficiency,
          "official_curve": render_official_curve, "demo_curve": render_demo_curve,
          "demo_measures": render_demo_measures, "unseen_videos": render_unseen_videos,
          "data_pipeline": render_data_pipeline, "reference_speed": render_reference_speed,
          "decode_memory": render_decode_memory, "gpu_check": render_gpu_check}


def load(path: Path) -> dict:
    """A raw result, with its name (results/<name>.json) for unaffected.json."""
    return {**json.loads(path.read_text()), "name": path.stem}


def unaffected() -> list[dict]:
    """results/unaffected.json: code changes shown to leave named results as they were
    (benchmarks/same_steps.py --record)."""
    path = RESULTS / "unaffected.json"
    return json.loads(path.read_text()) if path.is_file() else []


def stale_files(record: dict) -> list[str]:
    """The files of the measured code that are not as they were when it was measured, but
    for changes that unaffected.json vouches for, for this result."""
    now = code_hashes([f for f in record["code"] if (ROOT / f).is_file()])
    entries = unaffected()
    stale = []
    for f, digest in record["code"].items():
        seen = set()
        while now.get(f) != digest and digest not in seen:
            seen.add(digest)
            digest = next((e["to"] for e in entries if e["file"] == f and e["from"] == digest
                           and record.get("name") in e["results"]), digest)
        if now.get(f) != digest:
            stale.append(f)
    return stale


def unaffected_list() -> str:
    """`<!-- report: unaffected -->`: each change of the code that results were measured
    before (one line for the files of one check), why their figures stand, the check that
    shows it and the results it covers (those it names that measured one of its files)."""
    groups: dict[tuple, list[dict]] = {}
    for e in unaffected():
        groups.setdefault((e["why"], e["checked"]), []).append(e)
    if not groups:
        return "None: every result is measured at the code it names, or marked stale.\n"
    lines = []
    for (why, checked), entries in groups.items():
        files = ", ".join(f"`{e['file']}` ({e['from'][:8]} to {e['to'][:8]})" for e in entries)
        covered = sorted({n for e in entries for n in e["results"] if (RESULTS / f"{n}.json").is_file()
                          and e["file"] in json.loads((RESULTS / f"{n}.json").read_text())["code"]})
        command, _, how = checked.partition(": ")
        lines.append(f"- {files}: {why} Checked by `{command}`: {how}. Covers {len(covered)} results: "
                     f"{', '.join(covered)}.")
    return "\n".join(lines) + "\n"


def unfinished(record: dict) -> bool:
    """A curve stopped before the epochs its command asks for (its step goes on with --resume)."""
    if record["kind"] not in ("official_curve", "demo_curve"):
        return False
    asked = re.search(r"--epochs (\d+)", record["command"])
    done = max((r["epoch"] for r in record["data"]["epochs"]), default=0)
    return bool(asked) and done < int(asked.group(1))


def view_seeds(records: list[dict], method: str = "") -> str:
    """The built-in data's table over seeds: every method's accuracies (and video
    colorization's J), mean ± standard deviation over the compare results given, one a
    seed; `seeds.<method>`: that method's row alone (a method's doc)."""
    import plot
    rows = [[r for r in record["data"]["rows"] if r["method"] == method or not method] for record in records]
    videos = [r for seed in rows for r in seed if r["method"] == "video_colorization" and r.get("J") is not None]
    found = plot.found_in(rows)
    if not found and not videos:
        return f"No finished run{' of ' + method if method else ''} in these results.\n"
    return (plot.table(found) if found else "") + plot.video_rows(videos, [r["wall_s"] for r in videos if "wall_s" in r])


def view_compare(records: list[dict], method: str) -> str:
    """`compare.<method> NAME`: one method's row of a compare result's table (a method's doc)."""
    data = records[0]["data"]
    rows = [r for r in data["rows"] if r["method"] == method]
    if not rows:
        return f"No run of {method} in these results.\n"
    return render_compare({**data, "rows": rows})


def answer_curve(records: list[dict]) -> str:
    """One sentence: where moco.py stands on the official demo's curve, and how far it was run."""
    import official_curve
    rows = records[0]["data"]["epochs"]
    return (f"Does moco.py follow the official MoCo CIFAR-10 demo? Run to epoch {max((r['epoch'] for r in rows), default=0)} "
            f"of the demo's 200, kNN on the head output as the demo measures it: "
            f"{official_curve.verdict(rows)[0].lower()}{official_curve.verdict(rows)[1:]}")


PROBE = {"knn": "kNN", "linear": "linear"}


def _gains(rows: list[list[dict]]) -> dict:
    """method -> {probe: [gain of each seed]}, {probe + "_top1": [accuracy of each seed]}, "wall_s": [...]}
    over compare results' rows (one list a seed), image methods that finished."""
    out = {}
    for seed in rows:
        for r in seed:
            if r.get("status") != "ok" or "knn_top1" not in r:
                continue
            m = out.setdefault(r["method"], {"knn": [], "linear": [], "knn_top1": [], "linear_top1": [], "wall_s": []})
            for probe in ("knn", "linear"):
                m[probe].append(r[f"{probe}_top1"] - r[f"random_{probe}_top1"])
                m[f"{probe}_top1"].append(r[f"{probe}_top1"])
            m["wall_s"].append(r.get("wall_s"))
    return out


def _mean(values: list[float], spread: bool = True, sign: str = "+") -> str:
    import statistics
    text = f"{statistics.fmean(values):{sign}.3f}"
    return text + (f" ± {statistics.stdev(values):.3f}" if spread and len(values) > 1 else "")


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def seeds_summary(records: list[dict]) -> str:
    """The seeds table in words: who gains on both probes, in how long, the largest and
    smallest mean gains, and how far the seed moves an accuracy (a standard deviation)."""
    import statistics
    rows = [r["data"]["rows"] for r in records]
    g = _gains(rows)
    if not g:
        return "No method finished in these results."
    mean = {m: {p: statistics.fmean(v[p]) for p in ("knn", "linear")} for m, v in g.items()}
    losing = [m for m in g if min(mean[m].values()) <= 0]
    walls = [statistics.median(w) for v in g.values() if (w := [x for x in v["wall_s"] if x is not None])]
    gain = (f"Every method gains over its own random-init network on both probes (the mean of {len(rows)} seeds)"
            if not losing else f"Every method but {_names(losing)} gains over its own random-init network on both "
                               f"probes (the mean of {len(rows)} seeds)")
    gain += f", in {min(walls):.0f} to {max(walls):.0f} s a run (median)." if walls else "."
    by_knn = sorted(g, key=lambda m: -mean[m]["knn"])
    largest = [f"{m} ({_mean(g[m]['knn'])} / {_mean(g[m]['linear'])})" for m in by_knn[:3]]
    least = {p: min(g, key=lambda m: mean[m][p]) for p in ("knn", "linear")}
    smallest = [f"{m}'s {PROBE[p]} {_mean(g[m][p])}" for p, m in least.items()]
    spread = max(((statistics.stdev(v[f"{p}_top1"]), m, p) for m, v in g.items() for p in ("knn", "linear")
                  if len(v[f"{p}_top1"]) > 1), default=None)
    text = (f"{gain} The largest mean gains, kNN / linear: {_names(largest)}; the smallest: "
            f"{_names(smallest)}.")
    if spread:
        text += (f" The seed moves an accuracy by up to {spread[0]:.3f} (a standard deviation: {spread[1]}'s "
                 f"{PROBE[spread[2]]}), so a difference between two methods smaller than that means little.")
    videos = [r for seed in rows for r in seed if r["method"] == "video_colorization" and r.get("J") is not None]
    if videos:
        text += (f" Video colorization's pointer tracks the built-in objects at J "
                 f"{_mean([r['J'] for r in videos], sign='')}, the same pointer with a random network at "
                 f"{_mean([r['J_random_init'] for r in videos], sign='')}, the first mask copied at "
                 f"{_mean([r['J_copy_first'] for r in videos], sign='')}.")
    return text


def gains_summary(records: list[dict]) -> str:
    """One compare result's gains in words, largest kNN gain first (CIFAR-10's table)."""
    g = _gains([records[0]["data"]["rows"]])
    if not g:
        return "No method finished in this result."
    order = sorted(g, key=lambda m: -g[m]["knn"][0])
    return ("Gain over random init, kNN / linear, largest kNN gain first: " +
            ", ".join(f"{m} {_mean(g[m]['knn'])} / {_mean(g[m]['linear'])}" for m in order) + ".")


def davis_summary(records: list[dict]) -> str:
    """Video colorization's J on the DAVIS sample in words, beside its two baselines."""
    runs = [r for r in records[0]["data"]["rows"] if r["method"] == "video_colorization" and r.get("J") is not None]
    if not runs:
        return "Video colorization did not finish, or its videos have no masks past the first frame."
    r = runs[0]
    return (f"The paper's pointer tracks the {r['objects']} objects of the {r['videos']} videos at J {r['J']:.3f}, "
            f"against {r['J_copy_first']:.3f} for the first mask copied unchanged and {r['J_random_init']:.3f} "
            f"for the same pointer with a random network.")


def unseen_summary(records: list[dict]) -> str:
    """Tracking on seen and unseen videos in words: J against the copied first mask, per setting."""
    import statistics
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records[0]["data"]:
        if r["status"] == "ok":
            groups.setdefault((r["setting"], r["tracked"]), []).append(r)

    def pair(group):
        J, copy = (statistics.fmean(g[k] for g in group) for k in ("J", "J_copy_first"))
        return J, copy, f"{J:.3f} against {copy:.3f}"
    said = []
    for (setting, tracked), group in groups.items():
        if setting == "seen":
            J, copy, text = pair(group)
            said.append(f"Trained on the videos it tracks, the pointer {'beats' if J > copy else 'falls below'} "
                        f"copying the first mask ({text})")
    left = [(tracked, *pair(group)) for (setting, tracked), group in groups.items() if setting == "left out"]
    if left:
        beats = [f"{t} ({text})" for t, J, copy, text in left if J > copy]
        below = [f"{t} ({text})" for t, J, copy, text in left if J <= copy]
        said.append("on a video left out of its training it " + " and ".join(filter(None, (
            f"beats copying on {_names(beats)}" if beats else "", f"falls below it on {_names(below)}" if below else ""))))
    for (setting, tracked), group in groups.items():
        if setting == "built-in":
            J, copy, text = pair(group)
            said.append(f"trained on the built-in videos, it {'beats' if J > copy else 'falls below'} copying "
                        f"on the sample ({text})")
    if not said:
        return "No run finished in this result."
    text = "; ".join(said)
    return f"{text[0].upper()}{text[1:]} (J, the mean over seeds)."


def quickstart(records: list[dict]) -> str:
    """README's quick start in words: the seed-0 rotation run of a compare result on the built-in
    data (`python rotation.py --seed 0`, the quick start's command, with the default seed)."""
    rows = [r for r in records[0]["data"]["rows"] if r["method"] == "rotation" and r.get("status") == "ok"]
    if not rows:
        return "No rotation run in this result."
    r = rows[0]
    cores = re.search(r"(\d+) cores", records[0]["provenance"])
    return (f"As `benchmarks/tables.sh` runs it, this took {r['wall_s']:.0f} s"
            f"{' on ' + cores.group(1) + ' CPU cores' if cores else ''}; it tells the four turns of a test image apart "
            f"{r['pretext_top1']:.0%} of the time (chance 25%); its features give the image's class (one of ten) "
            f"with {r['knn_top1']:.3f} kNN accuracy and {r['linear_top1']:.3f} linear, against "
            f"{r['random_knn_top1']:.3f} and {r['random_linear_top1']:.3f} for the same network with random weights.")


def claims_summary() -> str:
    """Every claim of the lecture that claims.py measures, one verdict each, from the
    claim-<name>.json results there are (the rest: not measured yet)."""
    import claims
    lines = ["| claim | the lecture says | verdict | what decides it |", "|---|---|---|---|"]
    for claim in claims.CLAIMS:
        path = RESULTS / f"claim-{claim}.json"
        if not path.is_file():
            lines.append(claims.summary_row(claim, f"not measured yet: `results/{path.name}` missing"))
            continue
        record = load(path)
        note = " (stale)" if stale_files(record) else ""
        lines.append(claims.summary_row(claim, claims.verdict_of(claim, record["data"][claim]), note))
    return "\n".join(lines) + "\n"


NEEDS = {"cifar": "CIFAR-10 as JPEGs (`--cifar`)", "davis": "the DAVIS sample (`--davis`)",
         "demo": "CIFAR-10 as JPEGs and the MoCo demo's notebook (`--cifar`, `--moco-demo`)",
         "reference": "CIFAR-10 as JPEGs and the reference code (`--cifar`, `--moco-demo`, `--simclr-repo`)"}


def _minutes(record: dict) -> int:
    """A result's wall time in minutes: its provenance line's (the last sitting), or for a compare
    result finished over several sittings the sum of its runs' own times, when that is longer."""
    said = re.search(r"(\d+) min wall time", record["provenance"])
    runs = sum(r.get("wall_s") or 0 for r in record["data"]["rows"]) if record["kind"] == "compare" else 0
    return max(int(said.group(1)) if said else 0, round(runs / 60))


def _made(record: dict) -> str:
    """The provenance line, and for a compare result that tabulated runs kept from an earlier
    sitting (its line then gives only the last sitting's wall time) what the runs took."""
    said = re.search(r"(\d+) min wall time", record["provenance"])
    minutes = _minutes(record)
    if said and minutes > int(said.group(1)):
        return f"{record['provenance']} Its runs took {minutes} min in all, some in an earlier sitting."
    return record["provenance"]


def reproduce(steps: list[str]) -> str:
    """What tables.sh runs, step by step: each result's command, what it needs beyond the
    repository (a step given as NAME:cifar, NAME:davis or NAME:reference), the wall time its provenance line
    gives, and whether it is up to date. `claims` stands for every claim-<name>.json."""
    import claims
    rows, total, unknown = [], 0, False
    for step in steps:
        name, _, needs = step.partition(":")
        group = [f"claim-{c}" for c in claims.SWEEPS] if name == "claims" else [name]
        records = [load(RESULTS / f"{n}.json") for n in group if (RESULTS / f"{n}.json").is_file()]
        minutes = [_minutes(r) for r in records]
        command = ("`python benchmarks/claims.py --claims ...` (each claim)" if name == "claims" else
                   f"`{records[0]['command']}`" if records else "its step in `benchmarks/tables.sh`")
        if len(records) < len(group):
            state = "not measured yet" if not records else f"{len(group) - len(records)} of {len(group)} not measured yet"
            unknown = True
        else:
            state = "stale" if any(stale_files(r) for r in records) else "up to date"
        total += sum(minutes)
        rows.append(f"| {name} | {command} | {NEEDS.get(needs, 'nothing')} | "
                    f"{f'{sum(minutes)} min' if records else '?'} | {state} |")
    lines = ["| result | command | needs | time on 2 CPU cores | state |", "|---|---|---|---|---|", *rows, "",
             f"Total of the times measured: {total / 60:.1f} h{' (steps not measured yet not counted)' if unknown else ''}"
             f"{'; a claim counts the runs it shares with another, which the sweep runs once' if 'claims' in steps else ''}."]
    return "\n".join(lines) + "\n"


VIEWS = {"seeds": view_seeds, "compare": view_compare}  # <!-- report: seeds name1 name2 ... -->, compare.rotation name
# prose from results, a sentence or a few: <!-- report: answer-curve name -->, <!-- report: seeds-summary names -->
SENTENCES = {"answer-curve": answer_curve, "seeds-summary": seeds_summary, "gains-summary": gains_summary,
             "davis-summary": davis_summary, "unseen-summary": unseen_summary, "quickstart": quickstart}
# a block over whatever results there are: <!-- report: claims-summary -->, <!-- report: unaffected -->
SUMMARIES = {"claims-summary": claims_summary, "unaffected": unaffected_list}


def _stale_note(records: list[dict], kept: bool = False) -> list[str]:
    changed = sorted({f for record in records for f in stale_files(record)})
    if not changed:
        return []
    files = ', '.join(f'`{f}`' for f in changed)
    if kept:  # an earlier code's result, kept on purpose to compare with the current one
        commit = re.match(r"Made by commit (\w+)", records[0]["provenance"]).group(1)
        return [f"**Kept as measured:** {files} changed after this was measured; these are the figures of "
                f"commit {commit}'s code, kept to compare (its command, run at that commit, measures them again).", ""]
    return [f"**Stale:** {files} changed after this was measured; the figures "
            f"below are of the earlier code until the command is run again.", ""]


def render(spec: str) -> str:
    if spec in SUMMARIES:
        return SUMMARIES[spec]()
    if spec.startswith("reproduce "):
        return reproduce(spec.split()[1:])
    first = spec.split()[0]
    kept = first == "kept"  # <!-- report: kept NAME -->: an earlier code's result, not marked stale
    if kept:
        spec = spec.split(None, 1)[1]
        first = spec.split()[0]
    view, *names = spec.split() if first.split(".")[0] in (*VIEWS, *SENTENCES) else (None, spec)
    view, _, option = (view or "").partition(".")
    view = view or None
    missing = [n for n in names if not (RESULTS / f"{n}.json").is_file()]
    if missing:
        return f"Not measured yet: {', '.join(f'results/{n}.json' for n in missing)} missing.\n"
    records = [load(RESULTS / f"{n}.json") for n in names]
    if view in SENTENCES:
        return "\n".join(_stale_note(records)) + SENTENCES[view](records) + "\n"
    lines = _stale_note(records, kept) + [f"    {r['command']}" for r in records] + [""]
    table = (VIEWS[view](records, *([option] if option else [])) if view
             else RENDER[records[0]["kind"]](records[0]["data"])).rstrip("\n")
    made = _made(records[0]) if len(records) == 1 else \
        "\n".join(f"- `{n}`: {_made(r)}" for n, r in zip(names, records))  # a list: one line each
    return "\n".join(lines) + "\n" + table + "\n\n" + made + "\n"


def generated(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)


def targets() -> list[Path]:
    return [ROOT / "RESULTS.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each file that differs")
    p.add_argument("--fresh", nargs="+", metavar="NAME", help="write nothing; exit 0 if every results/NAME.json is "
                                                              "there, not stale and finished (tables.sh skips such a step)")
    p.add_argument("--resumable", metavar="NAME", help="write nothing; exit 0 if results/NAME.json is a curve of the "
                                                       "current code stopped before its last epoch (tables.sh resumes it)")
    a = p.parse_args(argv)
    if a.resumable:
        path = RESULTS / f"{a.resumable}.json"
        record = load(path) if path.is_file() else None
        raise SystemExit(0 if record and not stale_files(record) and unfinished(record) else 1)
    if a.fresh:
        paths = [RESULTS / f"{n}.json" for n in a.fresh]
        fresh = all(p.is_file() and not stale_files(r := load(p)) and not unfinished(r) for p in paths)
        raise SystemExit(0 if fresh else 1)
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
