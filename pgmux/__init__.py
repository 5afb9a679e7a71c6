"""pgmux: a PgBouncer-style PostgreSQL connection pooler."""

from pgmux import build as _build

__version__ = "0.1.0"

_build.install()  # PGMUX_PURE=1: the .py modules, before any of them is imported
