"""Every test runs in its own empty folder, so runs it starts write their outputs/ there and
never into the repository. Tests marked `long(seconds)` are collected first, longest first, so
that under `pytest -n 2` the two workers start on them and finish together."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long tests first, by their marked seconds (a stable sort: the rest keep their order)."""

    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("long")
        return marker.args[0] if marker else 0.0

    items.sort(key=seconds, reverse=True)
