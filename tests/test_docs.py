"""The docs speak of the code: each method's "lecture beside the code" table quotes lines
that still say what it claims, and every figure of README's results sits in RESULTS.md."""
import re

import pytest

from conftest import ROOT

METHODS = ("rotation", "patch_location", "jigsaw", "inpainting", "colorization", "split_brain",
           "video_colorization", "simclr", "moco")
QUOTE = re.compile(r"`(\w+\.py):(\d+)` `(.+?)`\s*\|")


def lecture_rows(method: str) -> list[tuple[str, int, str]]:
    text = (ROOT / "docs" / f"{method}.md").read_text()
    section = text.split("## The lecture beside the code", 1)[1].split("\n## ", 1)[0]
    return [(m.group(1), int(m.group(2)), m.group(3)) for m in QUOTE.finditer(section)]


@pytest.mark.parametrize("method", METHODS)
def test_the_lecture_beside_the_code_quotes_the_lines_it_names(method):
    rows = lecture_rows(method)
    assert len(rows) >= 4, f"docs/{method}.md: too few rows in 'The lecture beside the code'"
    for file, line, quoted in rows:
        lines = (ROOT / file).read_text().splitlines()
        assert 1 <= line <= len(lines), f"docs/{method}.md names {file}:{line}, past the end of the file"
        assert quoted in lines[line - 1], (f"docs/{method}.md: {file}:{line} no longer says `{quoted}`; "
                                          f"it says `{lines[line - 1].strip()}`")


SETTINGS = {"0.999", "0.001"}  # lambda_rec and lambda_adv, m = 0.999: options, not measurements


def figures(text: str) -> set[str]:
    """Accuracies and gains as the tables print them: 0.371, +0.202, and 0.013 in '0.371 ± 0.013'."""
    return {f for f in re.findall(r"[+-]?\b0\.\d{3}\b", text) if f.lstrip("+-") not in SETTINGS}


def test_every_figure_of_the_readmes_results_is_in_results_md():
    readme = (ROOT / "README.md").read_text()
    results = figures((ROOT / "RESULTS.md").read_text())
    missing = sorted(f for f in figures(readme) if f not in results and f.lstrip("+") not in results)
    assert not missing, f"README.md quotes figures RESULTS.md does not have: {missing}"


@pytest.mark.parametrize("method", METHODS)
def test_every_figure_of_a_method_doc_is_in_results_md(method):
    text = (ROOT / "docs" / f"{method}.md").read_text()
    results = figures((ROOT / "RESULTS.md").read_text())
    missing = sorted(f for f in figures(text) if f not in results and f.lstrip("+") not in results)
    assert not missing, f"docs/{method}.md quotes figures RESULTS.md does not have: {missing}"


def _texts():
    """(path, text) of every committed Markdown file and Python source the docs and comments live in."""
    paths = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*"),
             *(ROOT / "tests").glob("*.py")]
    return [(p, p.read_text()) for p in paths if p.is_file() and p.suffix in (".md", ".py", ".sh")]


def test_every_results_md_section_cited_exists():
    """`RESULTS.md, "Section"` (or a link to RESULTS.md followed by its section) names a
    heading that RESULTS.md has; a figure cited from RESULTS.md without a table beside it
    would have no way to be found again."""
    headings = [line.lstrip("#").strip() for line in (ROOT / "RESULTS.md").read_text().splitlines()
                if line.startswith("#")]
    cite = re.compile(r'RESULTS\.md(?:\]\([^)]*\))?,? "([^"]+)"')
    missing = [(p.name, name) for p, text in _texts() if p.name != "test_docs.py"
               for name in cite.findall(re.sub(r"\s*\n\s*(?:#\s*)?", " ", text))  # wrapped lines, comments too
               if not any(h.startswith(name) for h in headings)]
    assert not missing, missing


def test_every_relative_link_points_at_a_file():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = [(p.name, target) for p, text in _texts() if p.suffix == ".md" for target in link.findall(text)
              if "://" not in target and not (p.parent / target).exists()]
    assert not broken, broken


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_section_names_a_heading_there():
    link = re.compile(r"\]\(([^)#\s]*)#([^)\s]+)\)")
    broken = []
    for p, text in _texts():
        if p.suffix != ".md":
            continue
        for target, anchor in link.findall(text):
            page = (p.parent / target) if target else p
            if page.suffix != ".md" or not page.is_file():
                continue
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
            if anchor not in headings:
                broken.append((p.name, f"{target}#{anchor}"))
    assert not broken, broken


@pytest.mark.parametrize("method", METHODS)
def test_every_departure_says_whether_its_effect_is_measured(method):
    """Each numbered item of a method's "Departures from the paper" names the table that
    measures it or says that it is not measured."""
    text = (ROOT / "docs" / f"{method}.md").read_text()
    section = text.split("## Departures from the paper", 1)[1].split("\n## ", 1)[0]
    items = [" ".join(i.split()) for i in re.findall(r"(?ms)^\d+\. .*?(?=^\d+\. |\Z)", section)]
    assert items, f"docs/{method}.md: no numbered departures"
    silent = [i[:60] for i in items if "measured" not in i.lower()]
    assert not silent, f"docs/{method}.md: departures that say nothing of their effect: {silent}"
