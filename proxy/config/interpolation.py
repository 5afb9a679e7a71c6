"""${VAR} interpolation: environment variables in the configuration's strings.

`${NAME}` must be set, `${NAME:-default}` defaults when unset or empty,
`${NAME-default}` only when unset (as in sh), and `$${` is a literal `${`.
Done after YAML parsing, so a secret full of YAML syntax stays one string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pgmux.proxy.config.errors import join_key, key_error
from pgmux.proxy.config.values import Interpolated

_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], key: str) -> Any:
    """A copy of the parsed document with ${VAR} replaced in every string scalar."""
    if isinstance(value, dict):
        return {
            name: interpolate(item, env, join_key(key, str(name))) for name, item in value.items()
        }
    if isinstance(value, list):
        return [interpolate(item, env, f"{key}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        return _substitute(value, env, key)
    return value


def _substitute(text: str, env: Mapping[str, str], key: str) -> str:
    if "${" in _REFERENCE.sub("", text):
        raise key_error(key, "malformed ${...}: expected ${NAME} or ${NAME:-default}")
    substituted = False

    def one(match: re.Match[str]) -> str:
        nonlocal substituted
        if match[0] == "$${":  # the escape for a literal "${"
            return "${"
        name, operator, default = match.groups()
        value = env.get(name)
        # ${V:-d} defaults when V is unset or empty, ${V-d} only when unset (as in sh)
        if value is None or (operator == ":-" and value == ""):
            if operator is None:
                hint = f"; write ${{{name}:-default}} to give a default"
                raise key_error(key, f"environment variable {name} is not set{hint}")
            value = default
        substituted = True
        return value

    result = _REFERENCE.sub(one, text)
    return Interpolated(result) if substituted else result
