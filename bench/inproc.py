"""The in-process benchmark: CPU time of pgmux's data path per transaction.

No sockets, no kernel, no PostgreSQL: the in-process harness of
tests/inproc (fake transports, a scripted backend) drives the real
ClientConnection, Pool, ServerConnection, Translator and ResponseFilter,
with pgbench's workload (`-S`: one SELECT by primary key per transaction)
and its three query modes. Every client sends its next transaction as soon
as the previous one's ReadyForQuery reached it; clients beyond the pool's
12 servers wait in the pool's queue, so each transaction also pays a
release and a hand-off, as under load.

Cells: simple protocol with 64 and 256 clients, extended and `-M prepared`
with 64; 12 servers each. A cell runs in a fresh process: warm-up, then
time.process_time() around TRANSACTIONS transactions; the figure is the
minimum over PROCESSES processes (the least disturbed run of a busy
machine). The figures include the harness's fake backend and driver, the
same code for every tree.

    python bench/inproc.py                      # this checkout
    python bench/inproc.py TREE_A TREE_B        # two checkouts, processes interleaved
    python bench/inproc.py TREE TREE+pure       # compiled against PGMUX_PURE=1
    python bench/inproc.py A B --instructions   # instructions per transaction (valgrind)

With --instructions each cell runs under valgrind's callgrind twice, with
TRANSACTIONS and three times as many, and the figure is the difference in
instructions executed over the difference in transactions: the same for the
same code whatever else the machine is doing (hash seed fixed), so two trees
compare on a busy machine where CPU times drift by several per cent. It
counts work, not time (cache misses and the like are not in it).

Each tree runs with its own .venv/bin/python (its own pgmux), this file's
harness. A tree from before the move into floor packages (proxy/client.py
and so on) gets an import shim for the new module paths.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
import types
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent / "tests" / "inproc"

SERVERS = 12
CELLS = {  # name: (query mode, clients)
    "-S simple, 64 clients": ("simple", 64),
    "-S simple, 256 clients": ("simple", 256),
    "-S extended, 64 clients": ("extended", 64),
    "-M prepared, 64 clients": ("prepared", 64),
}
SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = "

# Modules of the tree before the move into floor packages, by their new names.
OLD_PATHS = {
    "pgmux.proxy.base.log": "pgmux.proxy.log",
    "pgmux.proxy.base.tasks": "pgmux.proxy.tasks",
    "pgmux.proxy.datapath.client": "pgmux.proxy.client",
    "pgmux.proxy.datapath.server": "pgmux.proxy.server",
    "pgmux.proxy.datapath.pool": "pgmux.proxy.pool",
    "pgmux.proxy.datapath.replies": "pgmux.proxy.responses",
    "pgmux.proxy.datapath.translator": "pgmux.proxy.prepared",
}


# --- one cell in this process ---------------------------------------------------


def install_shim() -> None:
    """Let the harness import the new module paths from a tree that predates them."""
    import importlib

    try:
        importlib.import_module("pgmux.proxy.datapath.client")
        return
    except ModuleNotFoundError:
        pass
    for new, old in OLD_PATHS.items():
        package = new.rsplit(".", 1)[0]
        if package not in sys.modules:
            shell = types.ModuleType(package)
            shell.__path__ = []  # a package with nothing on disk
            sys.modules[package] = shell
        module = importlib.import_module(old)
        sys.modules[new] = module
        setattr(sys.modules[package], new.rsplit(".", 1)[1], module)


def requests(mode: str, count: int = 1000) -> list[bytes]:
    """One transaction each, as pgbench -S -M MODE sends it (aids vary, as pgbench's)."""
    from pgmux.protocol import messages

    out = []
    for n in range(count):
        aid = str(1 + n * 7919 % 100_000).encode()
        if mode == "simple":
            out.append(messages.query(f"{SQL}{aid.decode()};"))
            continue
        statement = "" if mode == "extended" else "P0_1"
        head = messages.parse("", f"{SQL}$1;", [23]) if mode == "extended" else b""
        out.append(
            head
            + messages.bind("", statement, [aid])
            + messages.describe("P", "")
            + messages.execute("")
            + messages.sync()
        )
    return out


async def run_cell(mode: str, clients: int, transactions: int, warmup: int) -> float:
    """µs of CPU per transaction for one cell, in this process."""
    from harness import Harness

    from pgmux.protocol import messages

    harness = Harness(
        {
            "auth": {"type": "trust"},
            "databases": {"appdb": {"host": "/nonexistent/pgmux-inproc", "port": 5432}},
            "pool": {"size": SERVERS},
            "listen": {"max_client_conn": clients + 10},
        },
        record=False,
    )
    await harness.open_servers(SERVERS)
    ready_for_query = messages.ready_for_query("I")
    done: deque = deque()
    connections = []
    for _ in range(clients):
        client = harness.client()

        def answered(data: bytes, client=client) -> None:
            if data.endswith(ready_for_query):
                done.append(client)

        client.transport.sink = answered
        connections.append(client)
    if mode == "prepared":  # pgbench prepares once per connection, outside the timing
        for client in connections:
            client.send(messages.parse("P0_1", f"{SQL}$1;", [23]) + messages.sync())
            await harness.settle()
        done.clear()
    payloads = requests(mode)

    def drive(count: int) -> None:
        sent = 0
        queue = deque(connections)
        finished = 0
        deliver = harness.deliver
        while finished < count:
            while queue:
                client = queue.popleft()
                client.conn.data_received(payloads[sent % 1000])
                sent += 1
            deliver()
            finished += len(done)
            queue.extend(done)
            done.clear()

    drive(warmup)
    started = time.process_time()
    drive(transactions)
    return (time.process_time() - started) / transactions * 1e6


def worker(cell: str, transactions: int, warmup: int) -> None:
    sys.path.insert(0, str(HARNESS))
    install_shim()
    mode, clients = CELLS[cell]
    print(asyncio.run(run_cell(mode, clients, transactions, warmup)))


# --- many processes, one or two trees -------------------------------------------


PURE = "+pure"  # TREE+pure: that tree with PGMUX_PURE=1 (its .py modules, not the compiled)


def python_of(tree: Path) -> str:
    venv = tree / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def measure(tree: Path, cell: str, transactions: int, warmup: int) -> float:
    env = _clean_env()
    if tree.name.endswith(PURE):
        tree = Path(str(tree).removesuffix(PURE))
        env["PGMUX_PURE"] = "1"
    command = [python_of(tree), str(Path(__file__).resolve()), "--worker", cell]
    command += ["--transactions", str(transactions), "--warmup", str(warmup)]
    result = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{tree}: {cell} failed:\n{result.stderr}")
    return float(result.stdout.strip().splitlines()[-1])


def instructions(tree: Path, cell: str, transactions: int, warmup: int) -> float:
    """Instructions per transaction of CELL in TREE, by callgrind (see above)."""
    env = _clean_env()
    env["PYTHONHASHSEED"] = "0"
    counts = []
    for count in (transactions, 3 * transactions):
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        command += [python_of(tree), str(Path(__file__).resolve()), "--worker", cell]
        command += ["--transactions", str(count), "--warmup", str(warmup)]
        result = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
        found = re.search(r"Collected : (\d+)", result.stderr)
        if result.returncode != 0 or found is None:
            raise SystemExit(f"{tree}: {cell} failed under valgrind:\n{result.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (2 * transactions)


def instruction_table(trees: list[Path], cells: list[str], transactions: int, warmup: int) -> str:
    names = [tree.name for tree in trees]
    header = "| cell | " + " | ".join(f"{name} (instructions/tx)" for name in names)
    header += " | change |" if len(trees) == 2 else " |"
    lines = [header, "|---|" + "---:|" * (len(trees) + (len(trees) == 2))]
    for cell in cells:
        counts = [instructions(tree, cell, transactions, warmup) for tree in trees]
        row = f"| {cell} | " + " | ".join(f"{count:,.0f}" for count in counts)
        row += f" | {(counts[1] / counts[0] - 1) * 100:+.1f} % |" if len(trees) == 2 else " |"
        print(row)
        lines.append(row)
    return "\n".join(lines)


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PGMUX_PURE", None)
    env.pop("PYTHONPATH", None)  # each tree's own pgmux, from its venv
    return env


def run(trees: list[Path], cells: list[str], processes: int, transactions: int, warmup: int):
    samples: dict[tuple[str, str], list[float]] = {}
    for round_ in range(processes):
        for cell in cells:
            for tree in trees:  # interleaved: a slow minute hits both trees alike
                value = measure(tree, cell, transactions, warmup)
                samples.setdefault((str(tree), cell), []).append(value)
                print(f"round {round_ + 1}/{processes}  {tree.name:>12}  {cell}: {value:.2f} µs")
    return samples


def table(trees: list[Path], cells: list[str], samples) -> str:
    names = [tree.name for tree in trees]
    header = "| cell | " + " | ".join(f"{name} (min)" for name in names)
    header += " | change |" if len(trees) == 2 else " |"
    lines = [header, "|---|" + "---:|" * (len(trees) + (len(trees) == 2))]
    for cell in cells:
        minima = [min(samples[(str(tree), cell)]) for tree in trees]
        medians = [statistics.median(samples[(str(tree), cell)]) for tree in trees]
        row = f"| {cell} | " + " | ".join(
            f"{low:.2f} µs (median {mid:.2f})" for low, mid in zip(minima, medians, strict=True)
        )
        if len(trees) == 2:
            row += f" | {(minima[1] / minima[0] - 1) * 100:+.1f} % |"
        else:
            row += " |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, help="checkouts (default: this one)")
    parser.add_argument("--processes", type=int, default=5, help="processes per cell and tree")
    parser.add_argument("--transactions", type=int, default=20_000, help="timed, per process")
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--cells", nargs="*", choices=sorted(CELLS), default=list(CELLS))
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions (valgrind), not time"
    )
    parser.add_argument("--worker", choices=sorted(CELLS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.transactions, args.warmup)
        return
    trees = [tree.resolve() for tree in args.trees] or [HERE.parent]
    if len(trees) > 2:
        parser.error("one or two trees")
    if args.instructions:
        transactions = min(args.transactions, 1_000)  # callgrind runs ~50 times slower
        print(instruction_table(trees, args.cells, transactions, min(args.warmup, 300)))
        return
    samples = run(trees, args.cells, args.processes, args.transactions, args.warmup)
    print()
    print(table(trees, args.cells, samples))


if __name__ == "__main__":
    main()
