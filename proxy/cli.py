"""Command line: `pgmux -c FILE`, `pgmux --check -c FILE`, `pgmux --version`."""

from __future__ import annotations

import argparse
import sys

from pgmux import __version__

from .config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgmux", description="PgBouncer-style PostgreSQL connection pooler"
    )
    parser.add_argument("-c", "--config", help="configuration file (YAML)")
    parser.add_argument("config_file", nargs="?", help="configuration file (like pgbouncer FILE)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"pgmux {__version__}")
        return 0
    path = args.config or args.config_file
    if not path:
        print("pgmux: no configuration file (use -c FILE)", file=sys.stderr)
        return 2
    try:
        config = load_config(path)
        from .lifecycle import load_users

        load_users(config)
    except ConfigError as exc:
        print(f"pgmux: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pgmux: {exc}", file=sys.stderr)
        return 1
    if args.check:
        print(f"pgmux: configuration ok: {path}")
        return 0
    return run(config, verbosity=args.verbose, quiet=args.quiet)


def run(config, verbosity: int = 0, quiet: bool = False) -> int:  # config: Config
    import uvloop

    from .lifecycle import Daemon
    from .log import configure_logging

    level = "debug" if verbosity else ("warning" if quiet else config.logging.level)
    configure_logging(config.logging.format, level)
    return uvloop.run(Daemon(config).run())
