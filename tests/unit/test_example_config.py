"""`sipcdr.example.toml`, the documented example at the repository's root, cannot drift
from the loader: it loads to exactly the defaults, and it names every key the loader
accepts (set, or commented out as `# key = ...` where a key has no default), each in
its own section. A key added to the loader without a line here fails this test."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from sipcdr.config import Config, load_config, reading

EXAMPLE = Path(__file__).resolve().parents[2] / "sipcdr.example.toml"
# A trunk, so that the loader reads the keys of a [[trunks]] entry too.
# A trunk with a fraud override, so the loader reads the per-trunk tables too.
TRUNK = '\n[[trunks]]\nname = "carrier-a"\nsources = ["10.0.0.0/8"]\n\n[fraud.trunks.carrier-a]\n'

_HEADER = re.compile(r"^#?\s*\[\[?([A-Za-z0-9_.-]+)\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^#?\s*([a-z0-9_]+)\s*=")


def documented(text: str) -> set[tuple[str, str]]:
    """(section, key) for every key line, set or commented out, and (parent, name) for
    every section header."""
    found: set[tuple[str, str]] = set()
    section = ""
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            section = header[1]
            parts = section.split(".")
            found.update((".".join(parts[:i]), parts[i]) for i in range(len(parts)))
            continue
        key = _KEY.match(line)
        if key:
            found.add((section, key[1]))
    return found


@pytest.fixture
def accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> set[tuple[str, str]]:
    """(section, key) for every key the loader's tables accept, read while it loads the
    example with a trunk added."""
    seen: set[tuple[str, str]] = set()
    original = reading.Table.__init__

    def recording(
        self: reading.Table, context: reading.Context, path: str, raw: object, known: Iterable[str]
    ) -> None:
        known = tuple(known)
        section = re.sub(r"\[\d+\]", "", path)
        seen.update((section, key) for key in known)
        original(self, context, path, raw, known)

    monkeypatch.setattr(reading.Table, "__init__", recording)
    config = tmp_path / "sipcdr.toml"
    config.write_text(EXAMPLE.read_text() + TRUNK)
    load_config(config, {})
    return seen


def test_the_example_loads_to_the_defaults() -> None:
    assert load_config(EXAMPLE, {}) == Config()


def test_the_example_names_every_key_the_loader_accepts(accepted: set[tuple[str, str]]) -> None:
    assert len(accepted) > 60  # the recording saw the whole configuration
    missing = sorted(
        f"{section}.{key}".lstrip(".")
        for section, key in accepted - documented(EXAMPLE.read_text())
    )
    assert missing == []


def test_the_example_names_no_key_the_loader_refuses(accepted: set[tuple[str, str]]) -> None:
    # A per-trunk fraud table is named by a trunk, not by a key.
    named = {("fraud.trunks", "carrier-a")}
    extra = sorted(
        f"{s}.{k}".lstrip(".") for s, k in documented(EXAMPLE.read_text()) - accepted - named
    )
    assert extra == []


def _files_named(text: str) -> Iterator[str]:
    yield from re.findall(r"`((?:deploy|docs|schemas|tests|benchmarks)/[^`\s]+)`", text)
    yield from re.findall(r"(?<![\w/.-])([A-Za-z_][\w-]*\.(?:toml|md|yml|service))\b", text)


@pytest.mark.parametrize("document", ["README.md", "docs/architecture.md", "docs/fraud.md"])
def test_documents_point_only_at_files_in_the_repository(document: str) -> None:
    root = EXAMPLE.parent
    text = (root / document).read_text()
    names = set(_files_named(text))
    missing = []
    for name in sorted(names):
        if "/" in name:
            if not (root / name.rstrip(".,:;)")).exists():
                missing.append(name)
        elif name not in _repository_files(root) and name not in _NOT_FILES:
            missing.append(name)
    assert missing == []


def _repository_files(root: Path) -> set[str]:
    names: set[str] = set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith((".", "var"))]
        names.update(files)
        del folder
    return names


# Names that look like files in the documents but are what a user creates, or a part of
# a name: the test's pattern cannot tell them from the repository's own files.
_NOT_FILES = frozenset({"sipcdr.toml"})
