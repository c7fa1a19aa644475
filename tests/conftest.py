"""Every test runs in its own empty folder, so runs it starts write their outputs/ there and
never into the repository.

Under `pytest -n 2` (README's test command):
- the tests of a module that share a module-scoped fixture run on one worker (as one xdist
  group), so the fixture (often a multi-rank training) is computed once, not once per worker;
- tests are collected longest first, by their `long(seconds)` marks summed over their group,
  so the two workers start on the long ones and finish together (pyproject keeps xdist from
  reordering groups by their number of tests).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    defs = getattr(item, "_fixtureinfo", None)
    return defs is not None and any(
        d[-1].scope == "module" for d in defs.name2fixturedefs.values() if d
    )


def _group(item: pytest.Item) -> str:
    marker = item.get_closest_marker("xdist_group")
    return str(marker.args[0]) if marker else item.nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group tests sharing a module fixture; sort groups longest first (a stable sort)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None and _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))  # type: ignore[attr-defined]
    seconds: dict[str, float] = defaultdict(float)
    for item in items:
        marker = item.get_closest_marker("long")
        seconds[_group(item)] += marker.args[0] if marker else 0.0
    items.sort(key=lambda item: seconds[_group(item)], reverse=True)
