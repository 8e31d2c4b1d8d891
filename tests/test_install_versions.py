"""The tested-versions table of docs/install.md agrees with setup.cfg's lower bounds and requirements-cpu.txt's pins.

A floor raised or lowered in ``setup.cfg``, or a pin moved in ``requirements-cpu.txt``, without the table (or the
other way round) fails here: the table is what a user reads to know whether a version was ever tested.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)\s*(>=|==)\s*([0-9][0-9A-Za-z.*]*)$")
PYTHON_MARKER = re.compile(r'^python_version\s*(<|>=)\s*"(3\.[0-9]+)"$')


def _name(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


def _requirements(lines, python: str = "3.11") -> dict[str, tuple[str, str]]:
    """``{normalised name: (operator, version)}`` of requirement lines such as ``torch>=2.6``, for Python ``python``.

    A line may carry a ``python_version`` marker (``pandas==2.3.3; python_version < "3.11"``); lines whose marker
    does not hold for ``python`` are left out.
    """
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        line, _, marker = (part.strip() for part in line.partition(";"))
        if marker:
            m = PYTHON_MARKER.match(marker)
            assert m, f"unexpected environment marker {marker!r}"
            below = _release(python) < _release(m.group(2))
            if below != (m.group(1) == "<"):
                continue
        if line:
            m = REQUIREMENT.match(line)
            assert m, f"unexpected requirement {line!r}"
            assert _name(m.group(1)) not in out, f"{m.group(1)} is required twice for Python {python}"
            out[_name(m.group(1))] = (m.group(2), m.group(3))
    return out


def _release(version: str) -> tuple[int, ...]:
    """``2.6`` -> (2, 6, 0): the release numbers, padded so 2.6 and 2.6.0 compare equal."""
    parts = [int(p) for p in re.match(r"^[0-9]+(?:\.[0-9]+)*", version).group(0).split(".")]
    return tuple(parts + [0] * (4 - len(parts)))


def _setup_cfg() -> dict[str, dict[str, tuple[str, str]]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {"install": _requirements(cfg["options"]["install_requires"].splitlines()),
            "test": _requirements(cfg["options.extras_require"]["test"].splitlines())}


def _table() -> dict[str, list[str]]:
    """``{normalised name: [floor in setup.cfg, floors, GPU image, CI, CI on 3.10]}`` from docs/install.md's table."""
    text = (REPO / "docs" / "install.md").read_text()
    header = "| dependency | floor in setup.cfg | floors | GPU image | CI | CI on Python 3.10 |"
    assert header in text, f"docs/install.md lost its table header {header!r}"
    rows = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        rows[_name(cells[0].split()[0])] = cells[1:]  # "pytest (test)": the name before the note
    return rows


def test_every_declared_floor_is_in_the_table_and_was_tested_at_that_version():
    declared = _setup_cfg()
    table = _table()
    for group in ("install", "test"):
        for name, (op, floor) in declared[group].items():
            assert op == ">=", f"setup.cfg: {name} should declare a floor (>=), not {op}{floor}"
            assert name in table, f"docs/install.md: no row for {name} (setup.cfg {group}: {name}>={floor})"
            documented_floor, tested_at_floor = table[name][:2]
            assert documented_floor == floor, (
                f"docs/install.md: {name} floor {documented_floor!r}, setup.cfg says >={floor}")
            given = len(floor.split("."))  # 2.3 is met by 2.3.1 where 2.3.0 was never released
            assert _release(tested_at_floor)[:given] == _release(floor)[:given], (
                f"docs/install.md: {name} 'floors' column {tested_at_floor!r} is not the floor {floor}")
    extra = set(table) - set(declared["install"]) - set(declared["test"])
    assert not extra, f"docs/install.md: rows {sorted(extra)} are not dependencies in setup.cfg"


@pytest.mark.parametrize("python, column", [("3.11", 3), ("3.10", 4)])
def test_the_ci_columns_are_requirements_cpu(python, column):
    pins = _requirements((REPO / "requirements-cpu.txt").read_text().splitlines(), python)
    table = _table()
    assert set(pins) >= {"torch", "torchvision", "pandas"}, f"requirements-cpu.txt pins too little for {python}"
    for name, (op, version) in pins.items():
        assert op == "==", f"requirements-cpu.txt: {name} should be pinned (==)"
        assert name in table, f"docs/install.md: no row for {name}, pinned in requirements-cpu.txt"
        assert table[name][column] == version, (
            f"docs/install.md: {name} column {column + 1} {table[name][column]!r}, requirements-cpu.txt pins "
            f"{version} for Python {python}")
    for name, row in table.items():
        if name not in pins:
            assert re.fullmatch(r"\([0-9][^)]*\)", row[column]), (
                f"docs/install.md: {name} is not pinned in requirements-cpu.txt, so its column {column + 1} is the "
                f"version pip chose, in parentheses, not {row[column]!r}")


def test_the_checks_can_fail():
    assert _requirements(["torch>=2.6  # comment", "", "timm==1.0.31"]) == {"torch": (">=", "2.6"),
                                                                             "timm": ("==", "1.0.31")}
    marked = ['pandas==3.1.1; python_version >= "3.11"', 'pandas==2.3.3; python_version < "3.11"']
    assert _requirements(marked, "3.10") == {"pandas": ("==", "2.3.3")}
    assert _requirements(marked, "3.12") == {"pandas": ("==", "3.1.1")}
    with pytest.raises(AssertionError, match="twice"):
        _requirements(["pandas==3.1.1", 'pandas==2.3.3; python_version < "3.11"'], "3.10")
    assert _release("2.6") == _release("2.6.0") < _release("2.6.1") < _release("2.11.0+cu130")
    assert _name("huggingface_hub") == _name("huggingface-hub") == _name("HuggingFace.Hub")
