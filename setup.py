"""Build hook for the compiled hot path; the metadata is in pyproject.toml.

Adds the extension modules: the modules named in `sipcdr.hotpath.COMPILED_MODULES`,
compiled with mypyc from their typed source, and the C header scanner
(`daemon/sipcdr/sip/_scan.c`). They are built when a C compiler and mypyc are present
and SIPCDR_PURE_PYTHON is not set. Every extension is built or none is: a build that
fails warns and installs the pure-Python package, which is complete on its own.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HOTPATH = runpy.run_path(str(Path(__file__).parent / "daemon" / "sipcdr" / "hotpath.py"))
SCANNER_SOURCE = "daemon/sipcdr/sip/_scan.c"


def _warn(message: str) -> None:
    print(f"sipcdr: {message}; sipcdr will run its pure-Python source", file=sys.stderr)


def mypyc_extensions() -> list[Extension]:
    try:
        from mypyc.build import mypycify  # noqa: PLC0415 - a build requirement, maybe absent
    except ImportError:
        _warn("mypyc is not installed")
        return []
    sources = ["daemon/" + name.replace(".", "/") + ".py" for name in HOTPATH["COMPILED_MODULES"]]
    try:
        extensions = mypycify(sources, opt_level="3", debug_level="0")
    except (Exception, SystemExit) as exc:  # mypyc reports type errors by exiting
        _warn(f"mypyc failed ({exc!r})")
        return []
    try:
        mended = mended_runtime()
    except (ImportError, OSError) as exc:  # a mypyc laid out otherwise, an unwritable build/
        print(f"sipcdr: mypyc's bytes slice not mended ({exc!r})", file=sys.stderr)
        return extensions
    if mended is not None:
        for ext in extensions:
            ext.include_dirs.insert(0, mended)
            ext.depends.append(str(Path(mended, "bytes_ops.c")))
    return extensions


# mypyc's runtime slices bytes with a length of end - start after clamping both, so a
# slice whose end comes before its start (`b"abc"[2:1]`, b"" in Python) raises
# SystemError instead: hostile input reaches such slices in the decoders. The compiled
# code includes the runtime's sources by name from its include path, so a mended copy
# of that one file, found first, replaces it (the runtime is included by name, not
# copied into build/, as `mypycify` does by default and this build asks).
_BYTES_SLICE = "Py_ssize_t slice_len = endn - startn;"
_BYTES_SLICE_MENDED = "Py_ssize_t slice_len = endn > startn ? endn - startn : 0;"


def mended_runtime() -> str | None:
    """A folder holding mypyc's `bytes_ops.c` with the slice mended, or None when this
    mypyc's file no longer has the faulty line."""
    from mypyc.build import include_dir  # noqa: PLC0415 - present when this runs

    source = Path(include_dir(), "bytes_ops.c").read_text(encoding="utf-8")
    if _BYTES_SLICE not in source:
        return None
    folder = Path("build", "mypyc-runtime")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bytes_ops.c").write_text(
        source.replace(_BYTES_SLICE, _BYTES_SLICE_MENDED), encoding="utf-8"
    )
    return str(folder.resolve())


class AllOrNothingBuildExt(build_ext):
    """Builds every extension, or removes what it built and leaves the pure package:
    compiled modules reach each other's classes directly, so a partial set would not
    work, and a missing compiler must not fail the install."""

    def finalize_options(self) -> None:
        # mypyc type-checks and writes C when asked for its extensions: here, only when
        # something is built, rather than each time pip reads the metadata.
        if self.distribution.ext_modules:
            self.distribution.ext_modules[:0] = mypyc_extensions()
        super().finalize_options()

    def build_extensions(self) -> None:
        try:
            super().build_extensions()
        except Exception as exc:  # CompileError, a missing compiler, a linker failure
            _warn(f"the compiled hot path did not build ({exc})")
            self._remove_built()
            self.extensions = []

    def _remove_built(self) -> None:
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            paths = [Path(self.get_ext_fullpath(ext.name))]
            if self.editable_mode:
                # What an earlier editable build copied into the source tree.
                paths.append(Path(self._get_inplace_equivalent(build_py, ext)[0]))
            for path in paths:
                path.unlink(missing_ok=True)


def extensions() -> list[Extension]:
    """The scanner here, mypyc's modules when building (AllOrNothingBuildExt); none when
    SIPCDR_PURE_PYTHON is set, which also makes the wheel pure."""
    if HOTPATH["pure_python_forced"](os.environ):
        _warn(f"{HOTPATH['PURE_PYTHON_ENV']} is set, nothing compiled")
        return []
    return [Extension(HOTPATH["SCANNER_MODULE"], [SCANNER_SOURCE])]


setup(ext_modules=extensions(), cmdclass={"build_ext": AllOrNothingBuildExt})
