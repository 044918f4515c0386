"""Which implementation of the hot path runs: the modules compiled at install time, or
their Python source.

The modules in `COMPILED_MODULES` are compiled with mypyc from their typed source, and
the parser's innermost loop has a C twin (`sipcdr.sip._scan`), when a compiler is
present at install time (`setup.py`). The source is always installed beside them, and
is what runs instead when

* `SIPCDR_PURE_PYTHON` is set to anything but "", "0", "false" or "no" (`forced`);
* a module's source is newer than its compiled build (`stale`): an editable install
  whose files were edited since, where running the old build would hide the edit;
* nothing was compiled (`not_built`): no compiler at install time, or a failed build.

The choice is made once, when `sipcdr` is first imported, and for every module alike:
compiled modules reach each other's classes directly, so a mix of compiled modules
and interpreted ones would hold two different classes of one name.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

__all__ = [
    "COMPILED_MODULES",
    "PURE_PYTHON_ENV",
    "SCANNER_MODULE",
    "hot_path",
    "install",
    "load_interpreted",
]

# Compiled from the same source in one mypyc build.
COMPILED_MODULES: Final = (
    "sipcdr.sip.headers",
    "sipcdr.sip.address",
    "sipcdr.sip.message",
    "sipcdr.sip.parser",
    "sipcdr.sip.numbers",
    "sipcdr.hep",
    "sipcdr.decode.base",
    "sipcdr.decode.startline",
    "sipcdr.decode.websocket",
    "sipcdr.decode.tcp",
    "sipcdr.decode.tunnels",
    "sipcdr.decode.ip",
    "sipcdr.decode.sctp",
    "sipcdr.decode.link",
    "sipcdr.decode.prefilter",
    "sipcdr.decode.extract",
    "sipcdr.decode.capfile",
    "sipcdr.dialog.state",
    "sipcdr.dialog.kpi",
    "sipcdr.dialog.restore",
    "sipcdr.dialog.correlator",
    "sipcdr.fraud.windows",
    "sipcdr.fraud.numbering",
    "sipcdr.fraud.incidents",
    "sipcdr.fraud.detectors",
    "sipcdr.fraud.call_patterns",
    "sipcdr.fraud.monitor",
    "sipcdr.fraud.tap",
    # The per-message glue around the modules above: compiled, its calls into them
    # are direct calls rather than Python calls.
    "sipcdr.pipeline",
    # What the capture process does beside them per message and per call (the
    # signaling value, spool and journal records, the CDR stages), and the delivery
    # process's rows.
    "sipcdr.sipevent",
    "sipcdr.sinks.signaling",
    "sipcdr.spool.records",
    "sipcdr.spool.segments",
    "sipcdr.spool.writer",
    "sipcdr.dialogstore.journal",
    "sipcdr.dialogstore.appender",
    "sipcdr.enrich.stage",
    "sipcdr.rating.stage",
    "sipcdr.fraud.stage",
    "sipcdr.sinks.pgrows",
)
# The C header scanner: an extension with no Python twin; the parser runs its own loop
# without it.
SCANNER_MODULE: Final = "sipcdr.sip._scan"
# The packages the compiled modules live in; reloading a module reloads these too.
_PACKAGES: Final = (
    "sipcdr.sip",
    "sipcdr.decode",
    "sipcdr.dialog",
    "sipcdr.fraud",
    "sipcdr.sinks",
    "sipcdr.spool",
    "sipcdr.dialogstore",
    "sipcdr.enrich",
    "sipcdr.rating",
)

PURE_PYTHON_ENV: Final = "SIPCDR_PURE_PYTHON"
_FALSE_WORDS: Final = frozenset({"", "0", "false", "no", "off"})
# A wheel's files are written within moments of each other, in any order; an edit
# made after an editable build comes later than this.
_STALE_AFTER_S: Final = 2.0

COMPILED: Final = "compiled"
INTERPRETED: Final = "interpreted"

_ROOT: Final = Path(__file__).resolve().parent.parent


def _source_of(module: str) -> Path:
    return _ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _build_of(module: str) -> Path | None:
    """The compiled file of `module` beside its source, if there is one."""
    source = _source_of(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = source.with_suffix(suffix)
        if built.exists():
            return built
    return None


def pure_python_forced(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(PURE_PYTHON_ENV, "").strip().lower() not in _FALSE_WORDS


def _choose(environ: Mapping[str, str]) -> str:
    """ "" to run the compiled modules, or why the source runs instead."""
    if pure_python_forced(environ):
        return "forced"
    for module in COMPILED_MODULES:
        built = _build_of(module)
        if built is None:
            return "not_built"
        if _source_of(module).stat().st_mtime > built.stat().st_mtime + _STALE_AFTER_S:
            return "stale"
    return ""


class _SourceFinder:
    """A meta path finder (importlib.abc.MetaPathFinder, whose import costs more than
    this class) that finds the compiled modules' source files and keeps the scanner
    out."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == SCANNER_MODULE:
            raise ModuleNotFoundError(f"{fullname} is not used on the interpreted path")
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _source_of(fullname))


_reason = "unset"


def install(environ: Mapping[str, str] = os.environ) -> None:
    """Decide which implementation runs, once; `sipcdr/__init__` calls this before any
    hot-path module is imported."""
    global _reason  # noqa: PLW0603 - one decision per process, made at first import
    if _reason != "unset":
        return
    _reason = _choose(environ)
    if _reason:
        sys.meta_path.insert(0, _SourceFinder())


def hot_path() -> tuple[str, str]:
    """("compiled", "") when the compiled modules run, else ("interpreted", why):
    "forced", "stale" or "not_built". Imports the hot path if it is not yet."""
    modules = [importlib.import_module(name) for name in COMPILED_MODULES]
    if _reason or not all(_is_extension(module) for module in modules):
        return INTERPRETED, _reason or "not_built"
    return COMPILED, ""


def _is_extension(module: ModuleType) -> bool:
    return isinstance(
        getattr(module.__spec__, "loader", None), importlib.machinery.ExtensionFileLoader
    )


def load_interpreted() -> dict[str, ModuleType]:
    """The hot-path modules (and their packages) loaded from source, by name, beside
    those in use, which are back in `sys.modules` when this returns. For differential
    tests and benchmarks: both implementations in one process. Not for a process that
    imports on another thread meanwhile. A package's other modules are shared with
    the code in use when it had imported them before, and loaded beside it otherwise
    (then dropped from `sys.modules` again)."""
    names: tuple[str, ...] = (*_PACKAGES, *COMPILED_MODULES, SCANNER_MODULE)
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    before = set(sys.modules)
    finder = _SourceFinder()
    sys.meta_path.insert(0, finder)
    try:
        # Packages first: their __init__ imports the modules, now from source.
        return {name: importlib.import_module(name) for name in (*_PACKAGES, *COMPILED_MODULES)}
    finally:
        sys.meta_path.remove(finder)
        # The packages' __init__ also imported modules not imported before (the spool's
        # reader, the delivery loop): bound to the copies from source, they must not
        # stay for the code in use to import later.
        added = tuple(
            name for name in list(sys.modules) if name not in before and name.startswith("sipcdr.")
        )
        names = (*names, *added)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        # An import also binds a module to its parent package's attribute: those must
        # name the modules in use again (or nothing, for one not imported before).
        for name in names:
            parent, _, child = name.rpartition(".")
            if parent not in sys.modules:
                continue
            if name in saved:
                setattr(sys.modules[parent], child, saved[name])
            elif hasattr(sys.modules[parent], child):
                delattr(sys.modules[parent], child)
