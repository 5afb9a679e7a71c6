"""PgBouncer's setting names for the console: SHOW CONFIG rows and SET's keys.

SHOW CONFIG lists PgBouncer's settings first, under PgBouncer's names, so
tools written against PgBouncer's console keep working; `SET
default_pool_size = 5` works too, through pgmux_key.
"""

from __future__ import annotations

from pgmux.proxy.config.ini_map import SETTINGS, SETTINGS_BY_NAME, Setting
from pgmux.proxy.config.model import Config
from pgmux.proxy.config.schema import RUNTIME_SETTINGS


def pgbouncer_settings(config: Config) -> list[tuple[str, str, str, str]]:
    """SHOW CONFIG rows under PgBouncer's names: (key, value, default, changeable).

    For the admin console (SHOW CONFIG): the columns are PgBouncer's -- key,
    value, default, changeable ("yes"/"no") -- and the rows are PgBouncer's
    setting names, each with pgmux's effective value, spelled as PgBouncer
    shows it (seconds as numbers, booleans as 0/1, lists comma-separated) and
    PgBouncer's own default; changeable is "yes" when SET can change it at run
    time (RUNTIME_SETTINGS, through pgmux_key). It works for any Config, read
    from a YAML file or from a pgbouncer.ini. Settings pgmux has no
    equivalent for are left out; the pgmux-only keys are in
    show.settings_table(), which SHOW CONFIG lists after these rows.
    """
    rows = []
    for setting in SETTINGS:
        value = setting.value_in(config)
        if value is not None:
            rows.append((setting.name, value, setting.default, _changeable(setting)))
    return rows


def _changeable(setting: Setting) -> str:
    """Whether the console's SET can change it ("yes"/"no"); pgmux_key maps the name."""
    return "yes" if setting.target in RUNTIME_SETTINGS else "no"


def pgmux_key(name: str) -> str | None:
    """The pgmux key path for PgBouncer setting NAME ("default_pool_size" ->
    "pool.size"), or None; lets the console's SET accept PgBouncer's names."""
    setting = SETTINGS_BY_NAME.get(name.lower())
    return setting.target if setting is not None else None


def pgbouncer_only(name: str) -> str | None:
    """Why pgmux has no equivalent of PgBouncer setting NAME (its note, or
    "no equivalent"); None when NAME is not such a setting."""
    setting = SETTINGS_BY_NAME.get(name.lower())
    if setting is None or setting.target is not None:
        return None
    return setting.note or "no equivalent"


def pgbouncer_value(name: str, text: str) -> object:
    """TEXT for PgBouncer setting NAME, read as the ini reads it ("0.5" seconds,
    "plain" auth_type, "a, b" lists), into the value a pgmux YAML file holds;
    ValueError when the ini would refuse it."""
    return SETTINGS_BY_NAME[name.lower()].parse(text)
