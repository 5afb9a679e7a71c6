"""pgmux vs PgBouncer vs direct PostgreSQL: pgbench throughput, CPU and memory.

`make bench` runs this. It starts a throwaway PostgreSQL (pgmux.tempgres,
pgbench scale 10), PgBouncer (the Debian package) and pgmux with the same pool
(12 server connections, transaction pooling), then runs pgbench against each
in interleaved rounds (direct, PgBouncer, pgmux, direct, ...) so that noise
hits all of them alike. Medians per cell go to bench/results/<date>.md with a
PNG chart beside it; the ratios pgmux / PgBouncer and pgmux / direct are
printed at the end. A memory benchmark measures the RSS of each pooler
holding 1 000 and 10 000 idle client connections.

    python bench/run.py --clients "8 64 256" --modes "simple extended prepared" \
        --duration 10 --rounds 3 --workers "1 2"
    python bench/run.py --quick        # about two minutes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgmux.tempgres import TempPostgres, free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
USER, PASSWORD, DBNAME = "bench", "bench-secret", "bench"
POOL_SIZE = 12
SCALE = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")
INSTALL_PGBOUNCER = "apt-get update && apt-get install -y pgbouncer"


# --- what runs -----------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One pgbench configuration."""

    workload: str  # "select" (-S) or "tpcb"
    mode: str  # -M simple / extended / prepared
    clients: int
    connect: bool = False  # -C: a new connection per transaction

    @property
    def label(self) -> str:
        name = "-S" if self.workload == "select" else "TPC-B"
        return f"{name} {self.mode} c={self.clients}{' -C' if self.connect else ''}"

    def threads(self, cores: int) -> int:
        # pgbench <= 16 prepares with a blocking call per thread: TPC-B -M
        # prepared through a pooler with fewer servers than clients per thread
        # deadlocks inside pgbench, so each client gets its own thread there.
        if self.workload == "tpcb" and self.mode == "prepared":
            return self.clients
        return max(1, min(self.clients, cores))


@dataclass
class Run:
    tps: float = 0.0
    latency_ms: float = 0.0
    transactions: int = 0
    failed: int = 0
    aborted: int = 0
    cpu_us: float | None = None  # pooler CPU per transaction
    error: str = ""


@dataclass
class Target:
    name: str
    port: int
    pids: callable = field(default=lambda: [])  # processes whose CPU is charged to it


def cells_for(args: argparse.Namespace) -> list[Cell]:
    cells = []
    for workload in args.workloads:
        if workload == "connect":
            cells += [Cell("select", "simple", c, connect=True) for c in args.connect_clients]
            continue
        clients = args.clients if workload == "select" else args.tpcb_clients
        modes = args.modes if workload == "select" else args.tpcb_modes
        cells += [Cell(workload, m, c) for m in modes for c in clients]
    return cells


# --- processes and /proc -----------------------------------------------------------


def raise_nofile() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} during startup")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not accept on port {port} in {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the poolers ---------------------------------------------------------------------


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _as_postgres() -> None:
    """PgBouncer refuses to run as root: drop to the postgres OS user (in the child)."""
    entry = pwd.getpwnam("postgres")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def start_pgbouncer(
    binary: str, workdir: Path, pg: TempPostgres, *, auth: str, max_clients: int
) -> tuple[subprocess.Popen, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    version = pgbouncer_version(binary)
    lines = [
        "[databases]",
        f"{DBNAME} = host=127.0.0.1 port={pg.port} dbname={DBNAME}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        f"auth_type = {auth}",
        f"auth_file = {workdir / 'users.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {POOL_SIZE}",
        f"max_db_connections = {POOL_SIZE}",
        f"max_client_conn = {max_clients}",
        f"logfile = {workdir / 'pgbouncer.log'}",
        "ignore_startup_parameters = extra_float_digits",
    ]
    if version >= (1, 21):
        lines.append("max_prepared_statements = 200")
    (workdir / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
    (workdir / "users.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
    root = os.geteuid() == 0
    if root:
        for path in (workdir, *workdir.iterdir()):
            shutil.chown(path, "postgres", "postgres")
    with open(workdir / "stdout.log", "ab") as log:
        proc = subprocess.Popen(
            [binary, str(workdir / "pgbouncer.ini")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            preexec_fn=_as_postgres if root else None,
        )
    wait_port(port, proc, "pgbouncer")
    return proc, port


def start_pgmux(
    workdir: Path, pg: TempPostgres, *, workers: int, auth: str, max_clients: int
) -> tuple[subprocess.Popen, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "listen": {
            "addresses": ["127.0.0.1"],
            "port": port,
            "max_client_conn": max_clients,
            "workers": workers,
        },
        "pool": {"mode": "transaction", "size": POOL_SIZE, "max_server_connections": POOL_SIZE},
        "auth": {"type": auth, "users_file": "users.txt"},
        "logging": {"format": "json", "level": "info"},
        "databases": {DBNAME: {"host": "127.0.0.1", "port": pg.port}},
    }
    (workdir / "pgmux.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "users.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
    with open(workdir / "pgmux.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgmux", "-c", str(workdir / "pgmux.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    wait_port(port, proc, "pgmux")
    return proc, port


def start_floor(workdir: Path, pg: TempPostgres, *, workers: int) -> tuple[subprocess.Popen, int]:
    """bench/floor.py: forwarding and nothing else, in the same runtime as pgmux."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "floor.py"), "--listen-port", str(port)]
    argv += ["--pg-port", str(pg.port), "--user", USER, "--password", PASSWORD]
    argv += ["--dbname", DBNAME, "--pool", str(POOL_SIZE), "--workers", str(workers)]
    with open(workdir / "floor.log", "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    wait_port(port, proc, "floor")
    return proc, port


# --- pgbench -------------------------------------------------------------------------


def pgbench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = PASSWORD
    return env


def pgbench(
    pg: TempPostgres, port: int, cell: Cell, duration: float, cores: int
) -> tuple[str, int]:
    # -T counts from the start, SCRAM logins included (pgbench's tps leaves
    # them out): give many clients time to log in before the measured part.
    duration += cell.clients // 64
    argv = [
        os.path.join(pg.bindir, "pgbench"),
        *("-h", "127.0.0.1", "-p", str(port), "-U", USER, "-n"),
        *("-T", str(int(duration)), "-c", str(cell.clients), "-j", str(cell.threads(cores))),
        *("-M", cell.mode),
    ]
    if cell.workload == "select":
        argv.append("-S")
    if cell.connect:
        argv.append("-C")
    argv.append(DBNAME)
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, env=pgbench_env(), timeout=duration + 120
        )
    except subprocess.TimeoutExpired as exc:
        return f"timeout: {exc}", -1
    return result.stdout + result.stderr, result.returncode


def parse_pgbench(output: str, code: int) -> Run:
    run = Run()
    if m := re.search(r"^tps = ([\d.]+)", output, re.M):
        run.tps = float(m[1])
    if m := re.search(r"^latency average = ([\d.]+) ms", output, re.M):
        run.latency_ms = float(m[1])
    if m := re.search(r"^number of transactions actually processed: (\d+)", output, re.M):
        run.transactions = int(m[1])
    if m := re.search(r"^number of failed transactions: (\d+)", output, re.M):
        run.failed = int(m[1])
    run.aborted = len(re.findall(r"client \d+ (?:script \d+ )?aborted", output))
    if code != 0 or not run.tps:
        lines = [ln for ln in output.splitlines() if "error" in ln.lower() or "abort" in ln]
        candidates = lines or output.strip().splitlines()[-1:] or ["?"]
        run.error = candidates[0][:160]
    return run


def floor_can(cell: Cell) -> bool:
    """bench/floor.py does not rewrite prepared statements nor take part in -C logins."""
    return cell.mode != "prepared" and not cell.connect


def measure(pg: TempPostgres, target: Target, cell: Cell, duration: float, cores: int) -> Run:
    pids = target.pids()
    before = cpu_ticks(pids)
    output, code = pgbench(pg, target.port, cell, duration, cores)
    used = cpu_ticks(pids) - before
    run = parse_pgbench(output, code)
    if pids and run.transactions:
        run.cpu_us = used * 1_000_000 / CLK_TCK / run.transactions
    return run


# --- memory ---------------------------------------------------------------------------


def idle_clients_rss(port: int, pids_of: callable, count: int) -> tuple[int, int, int, int]:
    """(RSS before KiB, RSS with COUNT idle clients KiB, logged in, refused)."""
    time.sleep(1.0)  # the port accepts before every worker has started
    base = rss_kib(pids_of())
    opener = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "idle_clients.py"),
            "--port",
            str(port),
            "--count",
            str(count),
            "--user",
            USER,
            "--db",
            DBNAME,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = opener.stdout.readline().split()  # "ready <ok> <failed>"
        ok, failed = (int(line[1]), int(line[2])) if len(line) == 3 else (0, count)
        time.sleep(1.0)  # let the pooler settle (allocator, logging)
        held = rss_kib(pids_of())
    finally:
        opener.stdin.close()
        try:
            opener.wait(60)
        except subprocess.TimeoutExpired:
            opener.kill()
    return base, held, ok, failed


def memory_bench(
    pg: TempPostgres, workdir: Path, counts: list[int], workers: list[int], bouncer: str | None
) -> list[tuple[str, int, int, int, int, int]]:
    rows = []
    limit = max(counts) + 100
    for count in counts:
        poolers = [(f"pgmux-w{w}", w) for w in workers]
        if bouncer:
            poolers.append(("pgbouncer", 0))
        for name, w in poolers:
            where = workdir / f"mem-{name}-{count}"
            if w:
                proc, port = start_pgmux(where, pg, workers=w, auth="trust", max_clients=limit)
            else:
                proc, port = start_pgbouncer(bouncer, where, pg, auth="trust", max_clients=limit)
            try:
                base, held, ok, failed = idle_clients_rss(
                    port, lambda p=proc: process_tree(p.pid), count
                )
            finally:
                stop(proc)
            rows.append((name, count, base, held, ok, failed))
            print(
                f"  memory {name:10} {count:6} idle clients: RSS {held / 1024:7.1f} MiB "
                f"(idle pooler {base / 1024:.1f} MiB), {ok} logged in, {failed} refused"
            )
    return rows


# --- profiling ------------------------------------------------------------------------


def profile_pgmux(
    pg: TempPostgres, target: Target, cell: Cell, duration: float, cores: int, out: Path
) -> Path | None:
    """py-spy on the pgmux worker(s) during one pgbench run; raw stacks to OUT."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(pyspy, os.X_OK):
        print("  py-spy not installed (pip install py-spy): no profile")
        return None
    pids = target.pids()
    pid = pids[-1]  # the worker (or the only process)
    spy = subprocess.Popen(
        [
            pyspy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(duration)),
            "-r",
            "200",
            "-f",
            "raw",
            "--native",  # shows the time in write/read/epoll (the kernel's share)
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    time.sleep(1.0)
    measure(pg, target, cell, duration, cores)
    spy.wait(duration + 30)
    return out if out.exists() else None


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's raw format."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r" \((.*/)?([^/]*)\)", r" (\2)", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    lines = [f"samples: {total}", "", "self %   incl %   function"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / total:6.1f}  {100 * inclusive[frame] / total:6.1f}   {frame}")
    return "\n".join(lines)


# --- the report ------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    ok = [r for r in runs if r.tps]
    cpu = [r.cpu_us for r in ok if r.cpu_us is not None]
    return Run(
        tps=statistics.median([r.tps for r in ok]) if ok else 0.0,
        latency_ms=statistics.median([r.latency_ms for r in ok]) if ok else 0.0,
        transactions=sum(r.transactions for r in runs),
        failed=sum(r.failed for r in runs),
        aborted=sum(r.aborted for r in runs),
        cpu_us=statistics.median(cpu) if cpu else None,
        error=next((r.error for r in runs if r.error), ""),
    )


def ratio(a: Run | None, b: Run | None) -> str:
    """a.tps / b.tps; "aborted" when either side lost clients (its TPS means little)."""
    if a is None or b is None or not a.tps or not b.tps:
        return "n/a"
    if a.aborted or b.aborted:
        return "aborted"
    return f"{a.tps / b.tps:.2f}"


def report(
    args: argparse.Namespace,
    cells: list[Cell],
    names: list[str],
    medians: dict[tuple[Cell, str], Run],
    memory: list,
    chart: Path | None,
    versions: dict[str, str],
) -> str:
    muxes = [n for n in names if n.startswith("pgmux")]
    floors = [n for n in names if n.startswith("floor")]
    out = [
        f"# pgmux benchmark {args.stamp}",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}; {versions.get('postgres', '')}; "
        f"{versions.get('pgbouncer', 'PgBouncer: not installed')}.",
        f"pgbench scale {SCALE}, pool {POOL_SIZE} server connections per pooler, transaction "
        f"pooling, {args.duration:g} s per run, {args.rounds} interleaved round(s), medians.",
        "",
        "## Throughput (TPS, median)",
        "",
        "| cell | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{m}/PgBouncer | {m}/direct" for m in muxes)
        + "".join(f" | {floor}/PgBouncer" for floor in floors)
        + " |",
        "|---|" + "---:|" * (len(names) + 2 * len(muxes) + len(floors)),
    ]
    for cell in cells:
        row = [cell.label] + [f"{medians[cell, n].tps:,.0f}" for n in names]
        for m in muxes:
            row.append(ratio(medians[cell, m], medians.get((cell, "pgbouncer"))))
            row.append(ratio(medians[cell, m], medians[cell, "direct"]))
        for floor in floors:
            row.append(ratio(medians[cell, floor], medians.get((cell, "pgbouncer"))))
        out.append("| " + " | ".join(row) + " |")
    out += [
        "",
        "## Latency (ms, median), failed transactions, pooler CPU per transaction",
        "",
        "| cell | target | latency ms | failed | aborted clients | CPU µs/xact | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for cell in cells:
        for n in names:
            r = medians[cell, n]
            cpu = f"{r.cpu_us:.1f}" if r.cpu_us is not None else "-"
            out.append(
                f"| {cell.label} | {n} | {r.latency_ms:.2f} | {r.failed} | {r.aborted} "
                f"| {cpu} | {r.error.replace('|', '/')} |"
            )
    if memory:
        out += [
            "",
            "## Memory: RSS with idle client connections",
            "",
            "| pooler | idle clients | RSS idle pooler MiB | RSS with clients MiB "
            "| per client KiB | logged in | refused |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, count, base, held, ok, failed in memory:
            per = (held - base) / count if count else 0
            out.append(
                f"| {name} | {count:,} | {base / 1024:.1f} | {held / 1024:.1f} | "
                f"{per:.1f} | {ok} | {failed} |"
            )
    if chart:
        out += ["", f"![TPS chart]({chart.name})"]
    out += ["", "Command: `" + " ".join(sys.argv) + "`", ""]
    return "\n".join(out)


def draw_chart(cells: list[Cell], names: list[str], medians: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no chart")
        return None
    # -C runs are two orders of magnitude slower: a panel of their own.
    groups = [
        g for g in ([c for c in cells if not c.connect], [c for c in cells if c.connect]) if g
    ]
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(max(8, 1.1 * len(cells) + 2), 5),
        gridspec_kw={"width_ratios": [len(g) for g in groups]},
        squeeze=False,
    )
    width = 0.8 / len(names)
    for ax, group in zip(axes[0], groups, strict=True):
        for i, name in enumerate(names):
            xs = [c + i * width for c in range(len(group))]
            ax.bar(xs, [medians[cell, name].tps for cell in group], width, label=name)
        ax.set_xticks([c + width * (len(names) - 1) / 2 for c in range(len(group))])
        ax.set_xticklabels([cell.label for cell in group], rotation=30, ha="right", fontsize=8)
    axes[0][0].set_ylabel("TPS (median)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"pgbench through poolers (pool {POOL_SIZE}), {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.replace(",", " ").split()]

    def words(text: str) -> list[str]:
        return text.replace(",", " ").split()

    p = argparse.ArgumentParser(description="pgmux vs PgBouncer vs direct (pgbench)")
    p.add_argument("--clients", type=ints, default=None, help='select-only clients, "8 64 256"')
    p.add_argument("--tpcb-clients", type=ints, default=None, help='TPC-B clients, "64"')
    p.add_argument("--tpcb-modes", type=words, default=None, help='TPC-B modes, "simple prepared"')
    p.add_argument("--connect-clients", type=ints, default=None, help='-C clients, "64"')
    p.add_argument("--modes", type=words, default=None, help='"simple extended prepared"')
    p.add_argument("--workloads", type=words, default=None, help='"select tpcb connect"')
    p.add_argument("--duration", type=float, default=None, help="seconds per pgbench run")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--workers", type=ints, default=None, help='pgmux workers to compare, "1 2"')
    p.add_argument("--memory", type=ints, default=None, help='idle clients, "1000 10000"; "0" off')
    p.add_argument("--profile", action="store_true", help="py-spy pgmux during one extra run")
    p.add_argument(
        "--floor", action="store_true", help="also bench/floor.py (forwarding only), same workers"
    )
    p.add_argument("--quick", action="store_true", help="a ~2 minute subset")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "clients": [64, 256] if quick else [8, 64, 256],
        "tpcb_clients": [64],
        "tpcb_modes": ["simple"] if quick else ["simple", "prepared"],
        "connect_clients": [64],
        "modes": ["simple", "prepared"] if quick else ["simple", "extended", "prepared"],
        "workloads": ["select", "tpcb", "connect"],
        "duration": 2.0,
        "rounds": 1 if quick else 3,
        "workers": [1, 2] if (os.cpu_count() or 1) > 1 else [1],
        "memory": [1000] if quick else [1000, 10000],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.memory = [m for m in args.memory if m > 0]
    args.stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    return args


@contextlib.contextmanager
def cluster() -> Iterator[TempPostgres]:
    with TempPostgres(max_connections=400, settings={"shared_buffers": "128MB"}) as pg:
        pg.create_role(USER, PASSWORD)
        pg.create_database(DBNAME, owner=USER)
        init = subprocess.run(
            [
                os.path.join(pg.bindir, "pgbench"),
                "-i",
                "-q",
                "-s",
                str(SCALE),
                "-h",
                "127.0.0.1",
                "-p",
                str(pg.port),
                "-U",
                USER,
                DBNAME,
            ],
            capture_output=True,
            text=True,
            env=pgbench_env(),
        )
        if init.returncode != 0:
            raise SystemExit(f"pgbench -i failed:\n{init.stderr}")
        yield pg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bouncer = pgbouncer_binary()
    if bouncer is None:
        print(
            f"pgbouncer is not installed; install it with:\n  {INSTALL_PGBOUNCER}", file=sys.stderr
        )
        return 2
    raise_nofile()
    cores = os.cpu_count() or 1
    cells = cells_for(args)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pgmux-bench-"))
    if os.geteuid() == 0:
        os.chmod(workdir, 0o755)  # PgBouncer runs as postgres in a subdirectory
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        with cluster() as pg:
            versions = {
                "postgres": subprocess.run(
                    [os.path.join(pg.bindir, "postgres"), "--version"],
                    capture_output=True,
                    text=True,
                ).stdout.strip(),
                "pgbouncer": subprocess.run(
                    [bouncer, "--version"], capture_output=True, text=True
                ).stdout.splitlines()[0],
            }
            targets = [Target("direct", pg.port)]
            proc, port = start_pgbouncer(
                bouncer, workdir / "pgbouncer", pg, auth="scram-sha-256", max_clients=1000
            )
            procs.append(proc)
            targets.append(Target("pgbouncer", port, lambda p=proc: [p.pid]))
            for w in args.workers:
                proc, port = start_pgmux(
                    workdir / f"pgmux-w{w}", pg, workers=w, auth="scram-sha-256", max_clients=1000
                )
                procs.append(proc)
                targets.append(Target(f"pgmux-w{w}", port, lambda p=proc: process_tree(p.pid)))
            for w in args.workers if args.floor else []:
                proc, port = start_floor(workdir / f"floor-w{w}", pg, workers=w)
                procs.append(proc)
                targets.append(Target(f"floor-w{w}", port, lambda p=proc: process_tree(p.pid)))
            names = [t.name for t in targets]
            print(
                f"{len(cells)} cells x {len(targets)} targets x {args.rounds} rounds, "
                f"{args.duration:g} s each; PostgreSQL on {pg.port}, work dir {workdir}"
            )
            for target in targets:  # warm up: pools filled, caches hot
                measure(pg, target, Cell("select", "simple", 64), 2, cores)
            runs: dict[tuple[Cell, str], list[Run]] = {}
            for rnd in range(args.rounds):
                for cell in cells:
                    for target in targets:
                        if target.name.startswith("floor") and not floor_can(cell):
                            run = Run(error="floor: no prepared statements, no logins")
                        else:
                            run = measure(pg, target, cell, args.duration, cores)
                        runs.setdefault((cell, target.name), []).append(run)
                        cpu = f"{run.cpu_us:6.1f} µs/xact" if run.cpu_us is not None else ""
                        print(
                            f"  round {rnd + 1} {cell.label:28} {target.name:10} "
                            f"{run.tps:9.0f} tps {run.latency_ms:7.2f} ms "
                            f"failed {run.failed} {cpu} {run.error}",
                            flush=True,
                        )
            medians = {key: median_run(value) for key, value in runs.items()}
            profile_text = ""
            if args.profile:
                mux = next(t for t in targets if t.name.startswith("pgmux"))
                raw = profile_pgmux(
                    pg,
                    mux,
                    Cell("select", "simple", 64),
                    10,
                    cores,
                    workdir / "pyspy-raw.txt",
                )
                if raw:
                    profile_text = summarize_profile(raw)
                    summary = args.out / f"profile-{args.stamp}-pyspy.txt"
                    summary.write_text(profile_text + "\n")
                    print(f"profile summary: {summary}")
            for proc in procs:
                stop(proc)
            procs.clear()
            memory = (
                memory_bench(pg, workdir, args.memory, args.workers, bouncer) if args.memory else []
            )
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    chart = draw_chart(cells, names, medians, args.out / f"{args.stamp}.png")
    text = report(args, cells, names, medians, memory, chart, versions)
    path = args.out / f"{args.stamp}.md"
    path.write_text(text)
    print_ratios(cells, names, medians)
    print(f"\nresults: {path}" + (f", chart: {chart}" if chart else ""))
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


def print_ratios(cells: list[Cell], names: list[str], medians: dict) -> None:
    print("\nratios of medians (pgmux / PgBouncer, pgmux / direct):")
    for cell in cells:
        parts = []
        for m in (n for n in names if n.startswith(("pgmux", "floor"))):
            parts.append(
                f"{m}: {ratio(medians[cell, m], medians.get((cell, 'pgbouncer')))} / "
                f"{ratio(medians[cell, m], medians[cell, 'direct'])}"
            )
        print(f"  {cell.label:28} " + "   ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
