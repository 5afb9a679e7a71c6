"""Command line: `pgmux -c FILE`, `pgmux --check -c FILE`, `pgmux --version`.

pgmux always runs in the foreground and logs to stderr (systemd's journal
takes it from there), and to `logging.file` / syslog when configured; `-v` /
`-vv` log more (PgBouncer's -v), `-q` less: with a log file or syslog, `-q`
keeps stderr quiet as PgBouncer's does. `--pidfile` (or the config's
`pidfile`) writes the process id for tools that want one.
"""

from __future__ import annotations

import argparse
import signal
import sys

from pgmux import __version__
from pgmux.build import build
from pgmux.proxy.config import Config, ConfigError, read_config, unsupported_warning
from pgmux.proxy.config.tls import load_security
from pgmux.proxy.config.userlist import load_users


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgmux", description="PgBouncer-style PostgreSQL connection pooler"
    )
    parser.add_argument("-c", "--config", help="configuration file (YAML)")
    parser.add_argument("config_file", nargs="?", help="configuration file (like pgbouncer FILE)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v one level more than logging.level (or verbose), -vv debug",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="nothing on stderr when logging to a file or syslog; else warnings and errors only",
    )
    parser.add_argument("--pidfile", help="write the process id here (overrides `pidfile`)")
    # PgBouncer's command line, where it makes sense (docs/migrating-from-pgbouncer.md)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="with --check: reject PgBouncer settings that pgmux does not support",
    )
    parser.add_argument("-u", "--user", help="switch to this OS user after binding (as root)")
    parser.add_argument("-d", "--daemon", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-R", "--reboot", action="store_true", help=argparse.SUPPRESS)
    return parser


def _check_budget(config: Config) -> None:
    """--check: the fleet's server budget, against PostgreSQL when it answers."""
    import asyncio

    from pgmux.proxy.daemon.budget import report

    lines, warnings = asyncio.run(report(config, load_users(config)))
    for line in lines:
        print(f"pgmux: {line}")
    for warning in warnings:
        print(f"pgmux: warning: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        from pgmux.proxy.convert import main as convert_main

        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    refused = _refuse_pgbouncer_options(args)
    if refused is not None:
        return refused
    if args.version:
        print(f"pgmux {__version__} ({build()})")  # compiled or pure: pgmux/build.py
        return 0
    path = args.config or args.config_file
    if not path:
        print("pgmux: no configuration file (use -c FILE)", file=sys.stderr)
        return 2
    try:
        loaded = read_config(path)
        config = loaded.config
        load_users(config)
        load_security(config)  # certificates and the hba file, so --check sees them too
    except ConfigError as exc:
        print(f"pgmux: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pgmux: {exc}", file=sys.stderr)
        return 1
    warning = unsupported_warning(loaded.unsupported)
    if warning and (args.strict or args.check):
        print(f"pgmux: {'error' if args.strict else 'warning'}: {warning}", file=sys.stderr)
        if args.strict:
            return 1
    if args.check:
        print(f"pgmux: configuration ok: {path}")
        _check_budget(config)
        return 0
    pidfile = args.pidfile or config.pidfile
    from pgmux.proxy.daemon.lifecycle import (
        CONTROL_SIGNALS,
        PidfileError,
        remove_pidfile,
        write_pidfile,
    )

    # A signal sent as soon as the pidfile exists waits until the daemon's
    # handlers are in place (Daemon._install_signals unblocks them), instead
    # of killing pgmux before it can clean up.
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
    try:
        if pidfile:
            write_pidfile(pidfile)
    except PidfileError as exc:
        print(f"pgmux: {exc}", file=sys.stderr)
        return 1
    try:
        return run(
            config, verbosity=args.verbose, quiet=args.quiet, user=args.user, unsupported=warning
        )
    finally:
        if pidfile:
            remove_pidfile(pidfile)


def _refuse_pgbouncer_options(args: argparse.Namespace) -> int | None:
    """PgBouncer options pgmux does not have: a clear message and exit code 2."""
    if args.daemon:
        print(
            "pgmux: -d (daemonize) is not supported: pgmux runs in the foreground; "
            "run it under systemd (Type=notify, see systemd/pgmux.service) or another "
            "supervisor, which also takes its log from stderr",
            file=sys.stderr,
        )
        return 2
    if args.reboot:
        print(
            "pgmux: -R (online restart) is not supported: use RELOAD or SIGHUP to apply a "
            "new configuration, or systemd socket activation to restart without "
            "refusing connections",
            file=sys.stderr,
        )
        return 2
    return None


def run(
    config: Config,
    verbosity: int = 0,
    quiet: bool = False,
    user: str | None = None,
    unsupported: str | None = None,
) -> int:
    """Run the daemon (or its workers) on CONFIG; UNSUPPORTED is the warning
    naming the ini settings pgmux ignores, logged once the logging is set up."""
    import uvloop

    from pgmux.proxy.base.log import LogFileError, get_logger
    from pgmux.proxy.daemon.lifecycle import Daemon
    from pgmux.proxy.daemon.logsetup import setup_logging

    try:
        setup_logging(config, verbosity, quiet)
    except LogFileError as exc:
        print(f"pgmux: {exc}", file=sys.stderr)
        return 1
    log = get_logger("pgmux.config")
    log.info("process_up", **process_description())
    if unsupported:
        log.warning("unsupported_settings", detail=unsupported, config=config.path)
    if user is not None:
        from pgmux.proxy.base.privileges import PrivilegeError, check_user

        try:
            check_user(user)  # fail before binding, not after
        except PrivilegeError as exc:
            print(f"pgmux: {exc}", file=sys.stderr)
            return 1
        if config.listen.workers > 1:
            print("pgmux: -u is not supported with listen.workers > 1", file=sys.stderr)
            return 2
    if config.listen.workers > 1:
        from pgmux.proxy.supervisor import run_workers

        return run_workers(config)
    daemon = Daemon(config)
    if user is not None:
        from pgmux.proxy.base.privileges import drop_privileges

        daemon.after_bind = lambda: drop_privileges(user, daemon.listener.unix_path)
    return uvloop.run(daemon.run())


def process_description() -> dict[str, str]:
    """PgBouncer's "process up" line names its libraries; pgmux names its own."""
    import platform
    import ssl

    import uvloop

    return {
        "version": f"pgmux {__version__}",
        "runtime": f"Python {platform.python_version()}, uvloop {uvloop.__version__}",
        "tls": ssl.OPENSSL_VERSION,
    }
