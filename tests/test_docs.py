"""The documentation runs as written: code blocks execute, config examples validate, links and names resolve.

Convention for README.md, docs/*.md, benchmarks/README.md and launch/README.md (also stated in docs/design.md, "Documentation that runs"):

* ```` ```python ```` blocks are executed. The blocks of one page run in order in one namespace (like a notebook),
  in a fresh temporary directory holding links to the checkout's ``recipes/``, ``launch/`` and ``tests/``, so
  relative paths such as ``recipes/configs/demo.yaml`` work as they do from the repository root.
* ```` ```yaml ```` blocks must be study configs (top-level keys from ``StudyConfig``, or ``defaults``); each is
  loaded with :func:`scaling.config.load_config`, so a fragment is completed by the defaults and must validate.
* A block right after ``<!-- not-run: <reason> -->`` is skipped (say why: real data, GPUs, network). A block right
  after ``<!-- run-by: <test file> -->`` is executed by that test instead; the file must exist.
* Shell, console and plain blocks are never run.
* ``<!-- docs-test: demo-store -->`` on a page first writes a tiny finished demo study at ``runs/demo`` (the demo
  config cut to one backbone, two data fractions and a few steps), for pages that read a study's results.

Besides running code, the tests check that every relative link (and ``#anchor``) points to a file (and heading)
that exists, that every repository path named anywhere on a page (``scaling/...``, ``tests/...``, commands
included) exists, that every ``scaling.*`` name quoted in backticks resolves, and that every quoted config key
(``train.lr``, ``data.ood.0.root``) is a field of the config schema. Pointers from the code to the docs
(``docs/design.md, "one switch per concern"``, ``README "What we rely on"``) must name a page and heading that exist.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from scaling.config import StudyConfig, load_config, read_yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
         REPO / "launch" / "README.md"]
LINKED_DIRS = ("recipes", "launch", "tests")

FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(not-run|run-by):\s*(.+?)\s*-->\s*$")
DEMO_STORE = "<!-- docs-test: demo-store -->"


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    code: str
    marker: tuple[str, str] | None
    """``("not-run", reason)`` or ``("run-by", test file)`` from the line before the fence."""


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page, with the marker line that precedes each."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.name}:{start + 1}: unclosed code fence")
        prev = MARKER.match(lines[start - 1]) if start else None
        out.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                         (prev.group(1), prev.group(2)) if prev else None))
        i = j + 1
    return out


def _where(b: Block) -> str:
    return f"{b.page.relative_to(REPO)}:{b.line}"


# --------------------------------------------------------------------------------------------------------------
# Running the code
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    """A tiny finished demo study (2 runs), written once for every page that reads one."""
    from scaling.study.runner import run_study

    work = tmp_path_factory.mktemp("demo_store")
    (work / "recipes").symlink_to(REPO / "recipes")
    cwd = Path.cwd()
    os.chdir(work)
    try:
        cfg = load_config("recipes/configs/demo.yaml", [
            "output_dir=runs/demo", "grid.backbones=[resnetv2_tiny]", "grid.pretrained=[scratch]",
            "grid.fractions=[0.5, 1.0]", "train.examples=320", "data.image_size=32", "eval.n_boot=50"])
        run_study(cfg, report=False)
    finally:
        os.chdir(cwd)
    return work / "runs" / "demo"


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang in ("python", "yaml") and b.marker is None for b in blocks(p))]


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_page_code_runs(page, tmp_path, monkeypatch, request):
    for name in LINKED_DIRS:
        (tmp_path / name).symlink_to(REPO / name)
    if DEMO_STORE in page.read_text():
        shutil.copytree(request.getfixturevalue("demo_store"), tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    scope: dict = {"__name__": "__docs__"}
    for b in blocks(page):
        if b.marker is not None or b.lang not in ("python", "yaml"):
            continue
        try:
            if b.lang == "python":
                exec(compile(b.code, _where(b), "exec"), scope)
            else:
                _load_study_yaml(b, tmp_path)
        except Exception as e:  # name the block, keep the traceback
            raise AssertionError(f"{_where(b)}: {b.lang} block failed: {type(e).__name__}: {e}") from e


def _load_study_yaml(b: Block, tmp: Path) -> None:
    data = read_yaml(b.code)
    fields = {f.name for f in dataclasses.fields(StudyConfig)} | {"defaults"}
    assert isinstance(data, dict) and set(data) <= fields, (
        f"{_where(b)}: a yaml block must be a study config (keys {sorted(fields)}); mark anything else "
        f"<!-- not-run: ... -->")
    parts = tmp / "parts"  # `defaults:` entries of the shipped configs are relative to recipes/configs/
    if not parts.exists():
        parts.symlink_to(REPO / "recipes" / "configs" / "parts")
    path = tmp / f"block_{b.line}.yaml"
    path.write_text(b.code)
    load_config(path)


def test_markers_are_honest():
    """Every skipped block says why; every block run elsewhere names a test file that exists and reads the page."""
    problems = []
    for page in PAGES:
        for b in blocks(page):
            if b.marker is None:
                continue
            kind, arg = b.marker
            if kind == "not-run" and len(arg) < 10:
                problems.append(f"{_where(b)}: not-run needs a reason, got {arg!r}")
            if kind == "run-by":
                test = REPO / arg
                if not test.is_file():
                    problems.append(f"{_where(b)}: run-by names {arg}, which does not exist")
                elif page.name not in test.read_text():
                    problems.append(f"{_where(b)}: {arg} does not read {page.name}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------------------
# Links, paths, names and config keys
# --------------------------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(
    r"(?<![\w/.~-])(?:scaling|recipes|launch|benchmarks|tests|docs)/(?=(?P<rest>[\w./-]*))(?P=rest)(?![*<{\[])")
"""A repository path as written in prose or code; patterns (``launch/ds_zero*.json``, ``<name>.py``) are not paths.
The lookahead + backreference takes the longest run of path characters without backtracking into it (a possessive
``*+``, which Python 3.10's ``re`` does not have), so ``launch/ds_zero*.json`` is not matched as ``launch/ds_zer``."""
DOTTED = re.compile(r"scaling(?:\.[A-Za-z_]\w*)+")
SECTIONS = {f.name for f in dataclasses.fields(StudyConfig)} - {"name", "output_dir"}
CONFIG_KEY = re.compile(rf"((?:{'|'.join(sorted(SECTIONS))})(?:\.\w+|\[\])+)(?:\s*[=:].*)?")
FILE_SUFFIX = re.compile(r"\.(csv|gz|txt|json|yaml|xlsx|parquet|py|md|jpg|png|dcm|dicom|npz|safetensors|tar)$")


def _prose(page: Path) -> str:
    """The page without its fenced and indented code blocks (code is checked by running it)."""
    text = re.sub(r"^```.*?^```\s*$", "", page.read_text(), flags=re.S | re.M)
    return "\n".join(line for line in text.splitlines() if not line.startswith("    "))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page: Path) -> set[str]:
    """Anchors of every heading of a markdown page (duplicates get -1, -2 ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = github_anchor(m.group(1))
            out.add(a if a not in seen else f"{a}-{seen[a]}")
            seen[a] = seen.get(a, 0) + 1
    return out


def test_github_anchor_rule():
    assert github_anchor("Weights & Biases") == "weights--biases"
    assert github_anchor("Evaluation: `scaling.metrics`") == "evaluation-scalingmetrics"
    assert github_anchor("Scaling out: one GPU → N GPUs → N nodes") == "scaling-out-one-gpu--n-gpus--n-nodes"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(bad)


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _config_key_exists(key: str) -> bool:
    tp: typing.Any = StudyConfig
    for part in key.replace("[]", ".0").split("."):
        if typing.get_origin(tp) is tuple:  # a list of sections (data.ood, upstream): an index, then its item type
            if not part.isdigit():
                return False
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) is dict or tp is typing.Any:
            return True  # free-form mappings (data.options, model.kwargs)
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_names_and_config_keys_exist(page):
    bad = [f"path {path} does not exist" for path in sorted({m.group(0) for m in REPO_PATH.finditer(page.read_text())})
           if not (REPO / path.rstrip(".").rstrip("/")).exists()]  # prose and code alike
    for span in CODE_SPAN.findall(_prose(page)):
        span = span.strip()
        if DOTTED.fullmatch(span) and not _resolves(span):
            bad.append(f"name `{span}` does not resolve")
        m = CONFIG_KEY.fullmatch(span)
        if m and not FILE_SUFFIX.search(m.group(1)) and not _config_key_exists(m.group(1)):
            bad.append(f"config key `{m.group(1)}` is not in the schema (scaling/config.py)")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The resolvers reject what does not exist (so a green run means something)."""
    assert _resolves("scaling.data.load_table") and not _resolves("scaling.data.fixtures")
    assert _config_key_exists("data.ood.0.root") and _config_key_exists("upstream[].num_images")
    assert _config_key_exists("data.options.uncertainty") and not _config_key_exists("train.lrr")
    page = tmp_path / "p.md"
    page.write_text("# A title\n\n<!-- not-run: needs eight GPUs -->\n```python\nraise SystemExit\n```\n")
    (b,) = blocks(page)
    assert b.marker == ("not-run", "needs eight GPUs") and b.line == 4 and anchors(page) == {"a-title"}


# --------------------------------------------------------------------------------------------------------------
# Pointers from the code to the docs
# --------------------------------------------------------------------------------------------------------------

DOC_POINTER = re.compile(r'(docs/[\w-]+\.md)`*(?:,\s*"([^"]+)"|,\s*([^"()\n]+)\))?')
"""``docs/page.md``, optionally followed by the section: ``, "Heading"`` or ``, heading words)``."""
README_POINTER = re.compile(r'README\s*,?\s*\(?"([^"]+)"')
"""``README "Heading"``, ``README, "Heading"`` or ``README ("Heading")``."""


def _pointers(text: str) -> list[tuple[str, str]]:
    out = [(m.group(1), (m.group(2) or m.group(3) or "").strip()) for m in DOC_POINTER.finditer(text)]
    return out + [("README.md", m.group(1)) for m in README_POINTER.finditer(text)]


def test_pointers_from_code_to_docs_resolve():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for name in files:
        if name.endswith(".md") or name == "tests/test_docs.py":
            continue  # markdown pages are checked as links above
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for page, section in _pointers(text):
            if not (REPO / page).is_file():
                bad.append(f"{name}: {page} does not exist")
            elif section and github_anchor(section) not in anchors(REPO / page):
                bad.append(f"{name}: {page} has no section {section!r}")
    assert not bad, "\n".join(bad)


def test_pointer_patterns():
    assert _pointers('(``docs/design.md``, "Sharding is ours, launched by Accelerate")') == [
        ("docs/design.md", "Sharding is ours, launched by Accelerate")]
    assert _pointers("(docs/design.md, one switch per concern).") == [("docs/design.md", "one switch per concern")]
    assert _pointers('see ``docs/scaling-out.md``):') == [("docs/scaling-out.md", "")]
    assert _pointers('(see README "What we rely on")') == [("README.md", "What we rely on")]
