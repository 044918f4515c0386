"""No module of the package over 600 lines: one module owns one thing, and a module
that grows past this holds two (split it by concern, as spool/, dialogstore/ and
delivery/ are)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

PACKAGE_DIR: Final = Path(__file__).resolve().parents[2] / "daemon" / "sipcdr"
MAX_LINES: Final = 600


def oversized(root: Path, limit: int) -> list[str]:
    """`path: lines` of each module under `root` longer than `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_bytes().splitlines())
        if lines > limit:
            found.append(f"{path.relative_to(root.parent)}: {lines}")
    return found


def test_no_module_is_over_the_limit() -> None:
    assert oversized(PACKAGE_DIR, MAX_LINES) == []


def test_the_check_sees_the_package_and_counts_lines(tmp_path: Path) -> None:
    """A check that found nothing would pass the test above."""
    assert len(list(PACKAGE_DIR.rglob("*.py"))) > 100
    (tmp_path / "short.py").write_text("x = 1\n" * 600)
    (tmp_path / "long.py").write_text("x = 1\n" * 601)
    assert oversized(tmp_path, MAX_LINES) == [f"{tmp_path.name}/long.py: 601"]
