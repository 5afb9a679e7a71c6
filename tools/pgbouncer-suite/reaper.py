#!/usr/bin/env python3
"""Run a command as a child subreaper with an overall time bound.

usage: reaper.py SECONDS -- cmd [args...]

* Marks this process PR_SET_CHILD_SUBREAPER, so every process the command
  starts that gets orphaned (postgres daemonised by pg_ctl, socat, a
  daemonised or leaked pooler, ...) is re-parented to us instead of init.
* After SECONDS (or when we get SIGINT/SIGTERM) the command gets SIGINT
  (pytest then writes its reports), 8 s later a second SIGINT, 25 s after the
  first SIGKILL.
* When the command has exited, every process still parented to us (all of
  them descend from the command) gets SIGTERM, 3 s later SIGQUIT (immediate
  shutdown for postgres/pgbouncer), then SIGKILL; each is addressed by its
  pid, in a bounded number of rounds.
* Exit status: the command's (124 when the overall bound fired).
"""

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def children_of(ppid):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 (ppid) comes after the parenthesised comm, which may hold spaces
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) > 1 and int(rest[1]) == ppid:
            out.append(int(name))
    return out


def reap_nohang():
    for _ in range(10000):
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep(me):
    """Terminate every remaining child of ours, by pid, in bounded rounds."""
    killed = []
    for rnd in range(6):
        reap_nohang()
        kids = children_of(me)
        if not kids:
            break
        # TERM first; QUIT is an immediate shutdown for postgres and pgbouncer
        sig = (signal.SIGTERM, signal.SIGQUIT)[rnd] if rnd < 2 else signal.SIGKILL
        for pid in kids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
            except OSError:
                cmd = "?"
            if rnd == 0:
                killed.append(f"{pid} {cmd}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 3
        while time.time() < deadline:
            reap_nohang()
            if not children_of(me):
                break
            time.sleep(0.1)
    reap_nohang()
    if killed:
        print(f"reaper: stopped {len(killed)} leftover process(es):", file=sys.stderr)
        for k in killed[:50]:
            print(f"reaper:   {k}", file=sys.stderr)


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    bound = float(sys.argv[1])
    cmd = sys.argv[3:]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("reaper: prctl(PR_SET_CHILD_SUBREAPER) failed; orphans may leak", file=sys.stderr)

    me = os.getpid()
    if os.environ.get("REAPER_PIDFILE"):
        with open(os.environ["REAPER_PIDFILE"], "w") as f:
            f.write(f"{me}\n")
    child = os.fork()
    if child == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)

    deadline = time.time() + bound
    interrupted_at = None
    timed_out = False
    second_int = False
    status = None

    # forward INT/TERM to the command (e.g. an outer timeout or ^C)
    def fwd(signum, _frame):
        nonlocal interrupted_at
        if interrupted_at is None:
            interrupted_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    signal.signal(signal.SIGINT, fwd)
    signal.signal(signal.SIGTERM, fwd)

    while status is None:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == child:
            status = st
            break
        if pid == 0:
            now = time.time()
            if interrupted_at is None and now > deadline:
                print(
                    f"reaper: overall bound of {bound:.0f}s reached; SIGINT to {child}",
                    file=sys.stderr,
                )
                os.kill(child, signal.SIGINT)
                interrupted_at = now
                timed_out = True
            elif interrupted_at is not None and not second_int and now > interrupted_at + 8:
                # pytest-asyncio's runner turns a first SIGINT into a task
                # cancellation; a second one raises KeyboardInterrupt
                print(f"reaper: second SIGINT to {child}", file=sys.stderr)
                os.kill(child, signal.SIGINT)
                second_int = True
            elif interrupted_at is not None and now > interrupted_at + 25:
                print(f"reaper: SIGKILL to {child}", file=sys.stderr)
                os.kill(child, signal.SIGKILL)
                interrupted_at = float("inf")
            time.sleep(0.2)

    sweep(me)
    if timed_out:
        return 124
    if status is None:
        return 1
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
