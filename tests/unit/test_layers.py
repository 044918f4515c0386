"""The package's layers: every import of `daemon/sipcdr`, read with `ast`, points at the
importer's own layer or one below it. The layers and their reasons are in
docs/architecture.md ("Layers"); a module that fits none of them fails here until it is
given one.

Every import counts: at module level, inside a function (those that keep a start fast),
and under `if TYPE_CHECKING:` (a type is still a dependency on its module).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, NamedTuple

PACKAGE: Final = "sipcdr"
PACKAGE_DIR: Final = Path(__file__).resolve().parents[2] / "daemon" / PACKAGE

# Bottom to top; a module belongs to the longest prefix listed. The package itself
# (`sipcdr/__init__.py`) is matched only by its own name.
LAYERS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    (
        "pure",
        (
            "sipcdr",
            "sipcdr.model",
            "sipcdr.slotinit",
            "sipcdr.sipevent",
            "sipcdr.stages",
            "sipcdr.hotpath",
            "sipcdr.clock",
            "sipcdr.sip",
            "sipcdr.hep",
            "sipcdr.hepencode",
            "sipcdr.decode",
        ),
    ),
    (
        "logic",
        (
            "sipcdr.dialog",
            "sipcdr.enrich",
            "sipcdr.rating",
            "sipcdr.fraud",
            "sipcdr.privacy.settings",
            "sipcdr.privacy.plan",
        ),
    ),
    # The spool and its delivery loop, below the sinks that implement `Sink`.
    ("store", ("sipcdr.private", "sipcdr.spool", "sipcdr.delivery")),
    (
        "io",
        (
            "sipcdr.capture",
            "sipcdr.pipeline",
            "sipcdr.sinks",
            "sipcdr.storage",
            "sipcdr.dialogstore",
            "sipcdr.spare",
            "sipcdr.telemetry",
            # What the sinks and the metrics take from privacy (docs/architecture.md).
            "sipcdr.privacy.naming",
            "sipcdr.privacy.outbound",
            "sipcdr.privacy.pseudonym",
            "sipcdr.privacy.restriction_file",
            "sipcdr.privacy.stats",
        ),
    ),
    ("config", ("sipcdr.config",)),
    (
        "app",
        (
            "sipcdr.engine",
            "sipcdr.app",
            "sipcdr.deliverer",
            "sipcdr.intake",
            "sipcdr.limits",
            "sipcdr.antifraud",
            "sipcdr.importer",
            "sipcdr.import_delivery",
            "sipcdr.command_loop",
            "sipcdr.replay",
            "sipcdr.rates",
            "sipcdr.privacy",
        ),
    ),
    ("cli", ("sipcdr.cli", "sipcdr.__main__", "sipcdr.privacy.commands")),
)


class Import(NamedTuple):
    target: str  # the module imported (a package's own name for its __init__)
    path: Path  # the importing file, from the package's parent folder (sipcdr/...)
    line: int


class Layering:
    """Which layer a module is in: the index of its layer, bottom first."""

    def __init__(self, layers: Iterable[tuple[str, Iterable[str]]]) -> None:
        self.names: list[str] = []
        self._rank: dict[str, int] = {}
        for rank, (name, prefixes) in enumerate(layers):
            self.names.append(name)
            for prefix in prefixes:
                self._rank[prefix] = rank

    def rank(self, module: str) -> int | None:
        if module == PACKAGE:
            return self._rank.get(PACKAGE)
        parts = module.split(".")
        while len(parts) > 1:
            rank = self._rank.get(".".join(parts))
            if rank is not None:
                return rank
            parts.pop()
        return None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, list[Import]]:
    """Every module under the package folder `root`, with the package's modules it
    imports (third-party and standard-library imports are left out)."""
    files = {module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, list[Import]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imports: list[Import] = []
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import name` imports the module pkg.name when there is one.
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            else:
                continue
            imports.extend(
                Import(name, path.relative_to(root.parent), node.lineno)
                for name in names
                if name == root.name or name.startswith(f"{root.name}.")
            )
        # One arrow per module and line: `from m import a, b` names m once.
        graph[module] = sorted(set(imports), key=lambda item: (item.line, item.target))
    return graph


@functools.cache
def package_graph() -> dict[str, list[Import]]:
    return import_graph(PACKAGE_DIR)


def upward_imports(graph: Mapping[str, list[Import]], layering: Layering) -> list[str]:
    """One line per import that points at a higher layer than its importer's."""
    problems = []
    for module, imports in sorted(graph.items()):
        rank = layering.rank(module)
        if rank is None:
            continue  # reported by unplaced_modules
        for item in imports:
            target_rank = layering.rank(item.target)
            if target_rank is not None and target_rank > rank:
                problems.append(
                    f"{item.path}:{item.line}: {module} ({layering.names[rank]}) imports "
                    f"{item.target} ({layering.names[target_rank]})"
                )
    return problems


def unplaced_modules(graph: Mapping[str, list[Import]], layering: Layering) -> list[str]:
    return sorted(module for module in graph if layering.rank(module) is None)


def _write(root: Path, files: Mapping[str, str]) -> Path:
    package = root / PACKAGE
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


# -- the package itself ----------------------------------------------------------------------


def test_no_module_imports_from_a_higher_layer() -> None:
    problems = upward_imports(package_graph(), Layering(LAYERS))
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_module_has_a_layer() -> None:
    unplaced = unplaced_modules(package_graph(), Layering(LAYERS))
    assert not unplaced, (
        "modules in no layer (add them to LAYERS here and to docs/architecture.md):\n"
        + "\n".join(unplaced)
    )


def test_nothing_below_the_config_imports_it() -> None:
    """The rule the layering exists for, stated on its own: the config is read by the
    layers that build components, and the components take plain settings."""
    layering = Layering(LAYERS)
    config_rank = layering.names.index("config")
    offenders = [
        f"{item.path}:{item.line}: {module}"
        for module, imports in package_graph().items()
        if (layering.rank(module) or 0) < config_rank
        for item in imports
        if layering.rank(item.target) == config_rank
    ]
    assert not offenders, "\n".join(offenders)


def test_the_graph_sees_the_package() -> None:
    """A graph that found nothing would pass every check above."""
    graph = package_graph()
    assert len(graph) > 50
    outputs = {item.target for item in graph["sipcdr.sinks.outputs"]}
    assert "sipcdr.spool" in outputs
    cli = {item.target for item in graph["sipcdr.cli"]}
    assert "sipcdr.config" in cli  # a lazy import, inside a function


# -- the check on made-up packages -----------------------------------------------------------

SMALL_LAYERS: Final = (
    ("pure", ("sipcdr", "sipcdr.model")),
    ("io", ("sipcdr.sinks",)),
    ("config", ("sipcdr.config",)),
)


def test_an_upward_import_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "model.py": "X = 1\n",
            "config/__init__.py": "from sipcdr.model import X\n",
            "sinks/__init__.py": "",
            "sinks/outputs.py": "import os\n\nfrom sipcdr.config import X, Y\n",
        },
    )
    problems = upward_imports(import_graph(package), Layering(SMALL_LAYERS))
    assert problems == [
        "sipcdr/sinks/outputs.py:3: sipcdr.sinks.outputs (io) imports sipcdr.config (config)"
    ]


def test_every_form_of_import_is_seen(tmp_path: Path) -> None:
    """A lazy import, one under TYPE_CHECKING, `from sipcdr import config`, a plain
    `import`, and a relative one: each is an arrow."""
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "model.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from sipcdr.config import Config\n"
                "def f() -> None:\n"
                "    from sipcdr import config\n"
                "import sipcdr.sinks.kafka\n"
            ),
            "config/__init__.py": "",
            "sinks/__init__.py": "",
            "sinks/kafka.py": "from ..config import schema\n",
            "config/schema.py": "",
        },
    )
    problems = upward_imports(import_graph(package), Layering(SMALL_LAYERS))
    assert [line.split(": ", 1)[1] for line in problems] == [
        "sipcdr.model (pure) imports sipcdr.config (config)",
        "sipcdr.model (pure) imports sipcdr.config (config)",
        "sipcdr.model (pure) imports sipcdr.sinks.kafka (io)",
        "sipcdr.sinks.kafka (io) imports sipcdr.config.schema (config)",
    ]


def test_downward_and_sideways_imports_pass(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "model.py": "import json\n",
            "config/__init__.py": "from sipcdr.sinks import kafka\nfrom sipcdr import model\n",
            "sinks/__init__.py": "",
            "sinks/kafka.py": "from sipcdr.sinks.base import B\nfrom sipcdr.model import X\n",
            "sinks/base.py": "B = 1\n",
        },
    )
    assert upward_imports(import_graph(package), Layering(SMALL_LAYERS)) == []


def test_a_module_outside_every_layer_is_reported(tmp_path: Path) -> None:
    package = _write(tmp_path, {"__init__.py": "", "model.py": "", "engine.py": ""})
    assert unplaced_modules(import_graph(package), Layering(SMALL_LAYERS)) == ["sipcdr.engine"]
