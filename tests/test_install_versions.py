"""The tested-versions table of docs/install.md agrees with setup.cfg's lower bounds and requirements-cpu.txt's pins.

A floor raised or lowered in ``setup.cfg``, or a pin moved in ``requirements-cpu.txt``, without the table (or the
other way round) fails here: the table is what a user reads to know whether a version was ever tested.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)\s*(>=|==)\s*([0-9][0-9A-Za-z.*]*)$")


def _name(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


def _requirements(lines) -> dict[str, tuple[str, str]]:
    """``{normalised name: (operator, version)}`` of requirement lines such as ``torch>=2.6``."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            m = REQUIREMENT.match(line)
            assert m, f"unexpected requirement {line!r}"
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
    """``{normalised name: [floor in setup.cfg, floors, GPU image, CI]}`` from docs/install.md's table."""
    text = (REPO / "docs" / "install.md").read_text()
    header = "| dependency | floor in setup.cfg | floors | GPU image | CI |"
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


def test_the_ci_column_is_requirements_cpu():
    pins = _requirements((REPO / "requirements-cpu.txt").read_text().splitlines())
    table = _table()
    for name, (op, version) in pins.items():
        assert op == "==", f"requirements-cpu.txt: {name} should be pinned (==)"
        assert name in table, f"docs/install.md: no row for {name}, pinned in requirements-cpu.txt"
        assert table[name][3] == version, (
            f"docs/install.md: {name} CI column {table[name][3]!r}, requirements-cpu.txt pins {version}")
    for name, row in table.items():
        if name not in pins:
            assert re.fullmatch(r"\([0-9][^)]*\)", row[3]), (
                f"docs/install.md: {name} is not pinned in requirements-cpu.txt, so its CI column is the version "
                f"pip chose, in parentheses, not {row[3]!r}")


def test_the_checks_can_fail():
    assert _requirements(["torch>=2.6  # comment", "", "timm==1.0.31"]) == {"torch": (">=", "2.6"),
                                                                             "timm": ("==", "1.0.31")}
    assert _release("2.6") == _release("2.6.0") < _release("2.6.1") < _release("2.11.0+cu130")
    assert _name("huggingface_hub") == _name("huggingface-hub") == _name("HuggingFace.Hub")
