"""The build of the data path: compiled modules when installed, PGMUX_PURE=1 forces the .py ones."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from pgmux import __version__
from pgmux.build import COMPILED

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PGMUX_PURE"}
    if pure:
        env["PGMUX_PURE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _extension_built(module: str) -> bool:
    stem = ROOT.joinpath(*module.split(".")[1:])
    return any(stem.with_name(stem.name + suffix).exists() for suffix in EXTENSION_SUFFIXES)


FILES = "import importlib\n" + "".join(
    f"print(importlib.import_module({name!r}).__file__)\n" for name in COMPILED
)


def test_pure_forces_the_python_sources() -> None:
    files = _run(FILES, pure=True).splitlines()
    assert len(files) == len(COMPILED)
    assert all(file.endswith(".py") for file in files), files
    version = _run("from pgmux.proxy.cli import main; main(['--version'])", pure=True)
    assert version.splitlines()[0].startswith(f"pgmux {__version__} (pure;")


def test_default_loads_what_was_compiled() -> None:
    files = _run(FILES, pure=False).splitlines()
    for name, file in zip(COMPILED, files, strict=True):
        assert file.endswith(".py") != _extension_built(name), (name, file)
    built = sum(_extension_built(name) for name in COMPILED)
    expected = {0: "pure", len(COMPILED): "compiled"}.get(
        built, f"partly compiled ({built}/{len(COMPILED)})"
    )
    version = _run("from pgmux.proxy.cli import main; main(['--version'])", pure=False)
    assert version.splitlines()[0].startswith(f"pgmux {__version__} ({expected};")


def test_a_source_changed_after_compiling_runs_pure(tmp_path: Path) -> None:
    from pgmux.build import _stale

    source, generated = tmp_path / "framing.py", tmp_path / "framing.c"
    source.write_text("")
    assert not _stale(str(source))  # nothing generated: an installed wheel
    generated.write_text("")
    os.utime(source, (1_000, 1_000))
    assert not _stale(str(source))  # compiled after the last change
    os.utime(source, (3_000, 3_000))
    os.utime(generated, (2_000, 2_000))
    assert _stale(str(source))  # edited since: the extension must not run


def test_pure_runs_without_cython_installed() -> None:
    # Only the build needs Cython: the .py modules fall back to protocol/cyshim.py.
    code = (
        "import sys\nsys.modules['cython'] = None\n"
        "from pgmux.proxy.datapath import replies\n"
        "print(replies.__file__, replies.cython.__name__)"
    )
    file, shim = _run(code, pure=True).split()
    assert file.endswith("replies.py") and shim == "pgmux.protocol.cyshim"
