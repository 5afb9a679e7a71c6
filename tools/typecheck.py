"""Type-check pgmux with mypy (make lint).

The sources live in `protocol/` and `proxy/`, installed as `pgmux.protocol` and
`pgmux.proxy` (pyproject's package-dir). mypy resolves modules by directory,
so this lays out a tree of symlinks in `.mypy_tree/pgmux/` that mirrors the
installed package, runs mypy on it, and prints every path as the repository's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_tree"
PACKAGE = {"protocol": ROOT / "protocol", "proxy": ROOT / "proxy"}


def lay_out_tree() -> Path:
    package = TREE / "pgmux"
    package.mkdir(parents=True, exist_ok=True)
    for path in (ROOT / "pgmux").glob("*.py"):
        _link(package / path.name, path)
    for name, source in PACKAGE.items():
        _link(package / name, source)
    return package


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def main() -> int:
    package = lay_out_tree()
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        str(package / "protocol"),
        str(package / "proxy"),
    ]
    env = {**os.environ, "MYPYPATH": str(TREE)}
    result = subprocess.run(command, cwd=TREE, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    for name in PACKAGE:
        output = output.replace(f"pgmux/{name}/", f"{name}/")
    print(output, end="")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
