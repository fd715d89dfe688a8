"""The documentation stands on its own: a short README, links that resolve inside the repository, no pointers to
files a clone does not have, and no paths of the machine the docs were written on."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 12_000

# Spelled in pieces so that this file does not contain what it forbids.
FORBIDDEN = ("../" + "shared", "PAPER" + ".md", "CALIBRATION" + ".md")
MACHINE_PATHS = re.compile(r"(?<![\w.~-])/(?:tmp|work|root|home|Users)/")

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SKIP_DIRS = {".git", ".venv", "outputs", "multirun", ".cache", ".pytest_cache", "__pycache__", "node_modules"}
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".npz", ".npy", ".pt", ".pth", ".ckpt", ".onnx",
                   ".tar", ".gz", ".zip", ".whl", ".so", ".pyc"}


def _markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _strip_code_spans(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


def _links(page: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(page.read_text(encoding="utf-8"))
            for m in LINK.finditer(_strip_code_spans(line))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def _repo_files() -> list[Path]:
    """Tracked files plus untracked files git does not ignore; without git, a walk of the working tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
        files = [ROOT / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*")
                 if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    return [p for p in files if p.is_file()]


def _text_of(path: Path) -> str | None:
    """A file's text as a reader sees it; None for binary files. A notebook counts by its cells' sources only
    (outputs are not part of the repository's text)."""
    if path.suffix.lower() in BINARY_SUFFIXES:
        return None
    raw = path.read_bytes()
    if b"\0" in raw[:8192]:
        return None
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".ipynb":
        try:
            nb = json.loads(text)
        except json.JSONDecodeError:
            return text
        return "\n".join("".join(c.get("source", [])) if isinstance(c.get("source"), list) else str(c.get("source", ""))
                         for c in nb.get("cells", []))
    return text


def test_readme_is_short():
    size = len(README.read_bytes())  # bytes, the stricter count (×, →, ± take two or three)
    assert size < README_LIMIT, f"README.md has {size} bytes; keep it under {README_LIMIT} and move depth to docs/"


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page: Path):
    bad = []
    for target in _links(page):
        if _is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        try:
            dest.relative_to(ROOT)
        except ValueError:
            bad.append(f"{target}: points outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README) if not _is_external(t)}
    missing = [str(p.relative_to(ROOT)) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_no_file_points_at_notes_outside_the_repository():
    hits = []
    for path in _repo_files():
        text = _text_of(path)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            for word in FORBIDDEN:
                if word in line:
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {word}")
    assert not hits, "references to files a clone does not have (point at docs/paper.md instead):\n  " + \
        "\n  ".join(hits)


def test_docs_carry_no_machine_paths():
    pages = [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md")),
             *sorted((ROOT / "results").rglob("*.md"))]
    hits = []
    for page in pages:
        if not page.is_file():
            continue
        for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            m = MACHINE_PATHS.search(line)
            if m:
                hits.append(f"{page.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "absolute paths of the machine the docs were made on:\n  " + "\n  ".join(hits)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The helpers find a broken link, a missing anchor and a machine path (so a silent regex cannot pass)."""
    page = tmp_path / "page.md"
    page.write_text("# A title's `code`\n\nsee [x](missing.md), [y](page.md#a-titles-code), "
                    "![z](pic.png \"t\") and <https://example.org>\n```\n[not](a-link.md)\n```\n"
                    "run dir /tmp/x/out\n", encoding="utf-8")
    assert _links(page) == ["missing.md", "page.md#a-titles-code", "pic.png"]
    assert _anchors(page) == {"a-titles-code"}
    assert MACHINE_PATHS.search("run dir /tmp/x/out")
    assert not MACHINE_PATHS.search("data.root=/data/imagenet teacher.checkpoint=/ckpt/r50.pth")


def test_demo_numbers_check_catches_a_stale_readme(tmp_path):
    """`make check-demo` (run by CI) compares a fresh demo's table with the README's, number by number within the
    stated tolerance, and refuses another set of rows."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from check_demo_numbers import check, expected_table

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    results = {"teacher (demo)": {"1-NN": 95.28, "20-NN": 94.17, "cluster": 66.0, "cluster_std": 2.9,
                                  "linear": 94.44},
               "student (compress_2q)": {"1-NN": 95.56, "20-NN": 95.0, "cluster": 70.1, "cluster_std": 8.0,
                                         "linear": 94.72}}
    (run / "results.json").write_text(json.dumps(results))
    (run / ".hydra" / "config.yaml").write_text("eval:\n  cluster_seeds: 5\n")
    table = expected_table(run)
    assert table.splitlines()[1].split() == ["teacher", "(demo)", "95.28", "94.17", "66.00", "±", "2.9", "94.44"]
    good = tmp_path / "README.md"
    good.write_text(f"# x\n\nWhat it printed on this machine:\n\n```\nTop-1 (%) ...\n{table}\n```\n")
    assert check(run, good) == []
    near = tmp_path / "NEAR.md"  # another CPU: within the tolerance (2.5 points on k-NN and linear)
    near.write_text(good.read_text().replace("95.56", "97.50").replace("66.00", "78.00"))
    assert check(run, near) == []
    stale = tmp_path / "STALE.md"
    stale.write_text(good.read_text().replace("95.56", "98.50"))
    problems = check(run, stale)
    assert problems and "student (compress_2q), 1-NN: README 98.50, this run 95.56" in problems[0]
    other = tmp_path / "OTHER.md"  # a row missing is not a tolerance question
    other.write_text(good.read_text().replace(table.splitlines()[2], ""))
    assert check(run, other) and "another table" in check(run, other)[0]


# every repository path a page names exists, or a named command makes it (a renamed run cannot linger in the docs)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:results|docs|benchmarks|notebooks|conf|src|tests)/[A-Za-z0-9_./=-]*"
                       r"[A-Za-z0-9_/-])")
GENERATED = {  # paths that commands write (not committed): the command the page must name beside them
    "results/runs": "reproduce",  # the reproduction's run folders (docs/reproduction.md)
    "benchmarks/results/gpu_check.json": "gpu_check.py",  # written on a GPU machine
    "results/gpu_check.json": "gpu_check.py",
    "results/table1_fashion_mnist_full_fp32": "name=full_fp32",  # every row in fp32, on request
    "results/teacher/full_teacher_views8": "reproduce",  # the table's teacher cache (not committed: 80 MB)
    "results/teacher/full_teacher_views8_fp32": "reproduce-fp32",
}


def _named_paths(page: Path) -> list[tuple[int, str]]:
    return [(i, m.group(1).rstrip("/.")) for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            for m in REPO_PATH.finditer(line)]


def _path_problem(page: Path, path: str, run_keys: set[str]) -> str | None:
    text = page.read_text(encoding="utf-8")
    for prefix, command in GENERATED.items():
        if path == prefix or path.startswith((prefix + "/", prefix + ".")):
            if command not in text:
                return f"{path}: made by a command ({command}) the page does not name"
            if prefix == "results/runs" and path != prefix:  # a run folder: one the reproduction records
                name = path.split("/")[2]
                if name not in run_keys and not any(k.startswith(name) for k in run_keys if name.endswith("-")):
                    return f"{path}: no such run in results/progress_fashion_mnist.json"
            return None
    for base in (ROOT, page.parent):
        if (base / path).exists():
            return None
        if path.endswith(("_", "-")) or "." not in path.rsplit("/", 1)[-1]:  # a prefix or a stem (bench_*, .{md,json})
            if any(base.glob(path + "*")):
                return None
    return f"{path}: no such file in the repository"


def test_every_path_a_page_names_exists_or_is_made_by_a_named_command():
    runs = json.loads((ROOT / "results" / "progress_fashion_mnist.json").read_text())["runs"]
    pages = [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md")),
             *sorted((ROOT / "results").rglob("*.md"))]
    bad = [f"{page.relative_to(ROOT)}:{i}: {problem}" for page in pages for i, path in _named_paths(page)
           if (problem := _path_problem(page, path, set(runs))) is not None]
    assert not bad, "paths the docs name that are not there:\n  " + "\n  ".join(bad)


def test_the_path_check_catches_a_stale_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("exported `results/runs/resnet18_small-compress_2q-s0-113f5174e5/checkpoints/last.ckpt` after "
                    "make reproduce; see docs/nowhere.md and docs/paper.md\n", encoding="utf-8")
    found = [p for _, p in _named_paths(page)]
    assert found == ["results/runs/resnet18_small-compress_2q-s0-113f5174e5/checkpoints/last.ckpt",
                     "docs/nowhere.md", "docs/paper.md"]
    assert "no such run" in _path_problem(page, found[0], {"alexnet_small-cc-s0-7dfeacb7f9"})
    assert "no such file" in _path_problem(page, found[1], set())
    assert _path_problem(page, found[2], set()) is None
