"""Flags (proxy/core/flags.py): PAUSE, SUSPEND and DISABLE, without PostgreSQL."""

from __future__ import annotations

from pgmux.proxy.core.flags import Flags


def test_pause_all_or_one_database() -> None:
    flags = Flags()
    assert not flags.is_paused("appdb")
    flags.pause("appdb")
    assert flags.is_paused("appdb") and not flags.is_paused("otherdb")
    flags.pause()
    assert flags.is_paused("otherdb")


def test_resume_of_one_database_leaves_a_global_pause() -> None:
    flags = Flags()
    flags.pause()
    flags.pause("appdb")
    assert flags.resume("appdb") is False
    assert flags.is_paused("appdb")  # still under the global PAUSE
    assert flags.resume() is False
    assert not flags.is_paused("otherdb")


def test_suspend_pauses_everything_until_resume_says_so() -> None:
    flags = Flags()
    flags.suspend()
    assert flags.is_paused("appdb")
    assert flags.resume("appdb") is False and flags.suspended
    assert flags.resume() is True
    assert not flags.is_paused("appdb") and not flags.suspended
    assert flags.resume() is False  # nothing left to lift


def test_global_resume_keeps_database_pauses() -> None:
    flags = Flags()
    flags.pause("appdb")
    flags.resume()
    assert flags.is_paused("appdb")


def test_disable_and_enable() -> None:
    flags = Flags()
    flags.disable("appdb")
    assert flags.is_disabled("appdb") and not flags.is_disabled("otherdb")
    assert not flags.is_paused("appdb")  # DISABLE refuses logins, it does not pause
    flags.enable("appdb")
    assert not flags.is_disabled("appdb")
