"""Stand-in for the `cython` module when pgmux runs as pure Python without Cython.

A compiled module reads its `cython.locals` declarations at compile time; run as
a .py file it imports `cython` (present when Cython is installed) or this, under
which the declarations change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

compiled = False
Py_ssize_t = int  # a C type; a Python int when nothing is compiled


def locals(**types: object) -> Callable[[F], F]:
    """@cython.locals(name=type, ...): C types for a function's locals, here none."""

    def keep(function: F) -> F:
        return function

    return keep
