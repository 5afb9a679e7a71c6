#!/usr/bin/env bash
# Run PgBouncer's own pytest suite (test/ of a fetched PgBouncer git mirror)
# against any PgBouncer-compatible binary.  See README.md beside this file.
#
#   PGB_REPO=<bare git dir of pgbouncer/pgbouncer> [BOUNCER_EXE=...] \
#     tools/pgbouncer-suite/run.sh [pytest selection / extra pytest args...]
#
# Env:
#   PGB_REPO         required: git dir (`git clone --mirror` of pgbouncer/pgbouncer); the suite is
#                    exported from it at run time, never stored here
#   PGB_REV          revision to export (default HEAD)
#   BOUNCER_EXE      binary under test (default /usr/sbin/pgbouncer); must be
#                    executable by the user the suite runs as (see RUN_USER)
#   JUNIT            also copy the JUnit XML report to this path
#   FAILED_LIST      write the failed test ids (one per line) to this path
#   LOG              keep pytest's full output in this file (default: thrown away,
#                    only its tail is printed); VERBOSE=1 streams it instead
#   K                pytest -k expression
#   IGNORE           space-separated test file names to leave out,
#                    e.g. "test_replication.py test_peering.py"
#   WORKERS          pytest-xdist workers (default 2; 0 = no xdist)
#   TIMEOUT          per-test timeout in seconds (default 60)
#   OVERALL_TIMEOUT  bound for the whole pytest run in seconds (default 3600)
#   RUN_USER         OS user the suite runs as when started as root
#                    (default postgres: initdb and pgbouncer refuse root)
#   PG_BINDIR        PostgreSQL server binaries (default /usr/lib/postgresql/15/bin)
#   PGB_TLS          yes|no: tell the suite whether the binary supports TLS
#                    (default: auto, from the "tls:" line of `BOUNCER_EXE --version`)
#   PGB_LDAP         yes|no (default no: LDAP tests need slapd)
#   PGB_PYTHON       interpreter for the venv (default /usr/bin/python3)
#   PGB_SUITE_CACHE  where the venv is cached (default $HOME/.cache/pgb-suite,
#                    or ${TMPDIR:-/tmp}/pgb-suite-cache when run as root for
#                    another RUN_USER, since that user cannot enter root's home)
#   KEEP=1           keep the temp work dir (printed) for debugging
# Output: a list of failed tests, a per-file table, and as last line exactly
# "N passed, M failed" (each test once; setup/teardown errors count as failed).
# Exit: 0 when the suite ran (whatever the counts), 2 on harness/setup errors.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "pgb-suite: $*" >&2; exit 2; }

[ -n "${PGB_REPO:-}" ] || die "PGB_REPO (bare git dir of pgbouncer/pgbouncer) is required"
git --git-dir="$PGB_REPO" rev-parse --verify -q "${PGB_REV:-HEAD}^{commit}" >/dev/null \
  || die "PGB_REPO=$PGB_REPO has no revision ${PGB_REV:-HEAD}"
REV="$(git --git-dir="$PGB_REPO" rev-parse "${PGB_REV:-HEAD}^{commit}")"

BOUNCER_EXE="${BOUNCER_EXE:-/usr/sbin/pgbouncer}"
case "$BOUNCER_EXE" in /*) ;; *) BOUNCER_EXE="$(command -v "$BOUNCER_EXE" || echo "$PWD/$BOUNCER_EXE")" ;; esac
[ -x "$BOUNCER_EXE" ] || die "BOUNCER_EXE=$BOUNCER_EXE is not executable"

WORKERS="${WORKERS:-2}"
TIMEOUT="${TIMEOUT:-60}"
OVERALL_TIMEOUT="${OVERALL_TIMEOUT:-3600}"
PG_BINDIR="${PG_BINDIR:-/usr/lib/postgresql/15/bin}"
[ -x "$PG_BINDIR/initdb" ] || die "no initdb in PG_BINDIR=$PG_BINDIR"
for t in psql socat openssl; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install -y postgresql-client socat openssl)"
done
PGB_PYTHON="${PGB_PYTHON:-/usr/bin/python3}"
command -v "$PGB_PYTHON" >/dev/null || PGB_PYTHON=python3

# --- who runs the suite -------------------------------------------------------
AS=()
if [ "$(id -u)" = 0 ]; then
  RUN_USER="${RUN_USER:-postgres}"
  id "$RUN_USER" >/dev/null 2>&1 || die "RUN_USER=$RUN_USER does not exist"
  [ "$RUN_USER" != root ] || die "the suite cannot run as root (initdb refuses)"
  AS=(runuser -u "$RUN_USER" --)
  DEFAULT_CACHE="${TMPDIR:-/tmp}/pgb-suite-cache"
else
  RUN_USER="$(id -un)"
  DEFAULT_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/pgb-suite"
fi
"${AS[@]}" test -x "$BOUNCER_EXE" || die "$RUN_USER cannot execute $BOUNCER_EXE (every directory above it must be searchable by $RUN_USER)"

# --- venv (cached, keyed by the pinned requirements) ---------------------------
REQS="pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0 pytest-xdist==3.8.0 psycopg==3.2.13 filelock==4.2.11"
CACHE="${PGB_SUITE_CACHE:-$DEFAULT_CACHE}"
KEY="$(printf '%s %s' "$REQS" "$("$PGB_PYTHON" -c 'import sys; print(sys.version)')" | sha1sum | cut -c1-12)"
VENV="$CACHE/venv-$KEY"
if [ ! -f "$VENV/.complete" ]; then
  echo "pgb-suite: creating venv $VENV" >&2
  mkdir -p "$CACHE" || die "cannot create $CACHE"
  rm -rf "$VENV"
  ( umask 022
    "$PGB_PYTHON" -m venv "$VENV" \
    && "$VENV/bin/pip" install -q --disable-pip-version-check $REQS ) > "$CACHE/pip.log" 2>&1 \
    || { cat "$CACHE/pip.log" >&2; rm -rf "$VENV"; die "venv creation failed"; }
  touch "$VENV/.complete"
fi
chmod -R a+rX "$CACHE" 2>/dev/null || true

# --- work dir: export the suite from the mirror ----------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pgb-suite.XXXXXX")" || die "mktemp failed"
REAPER_PIDFILE="$WORK/reaper.pid"
RUNNING=0
cleanup() {
  local rc=$? rp=""
  if [ "$RUNNING" = 1 ] && [ -s "$REAPER_PIDFILE" ]; then
    rp="$(cat "$REAPER_PIDFILE")"
    # SIGINT to the reaper: it stops pytest, then stops what pytest left behind
    kill -INT "$rp" 2>/dev/null
    for _ in $(seq 1 90); do kill -0 "$rp" 2>/dev/null || break; sleep 1; done
    kill -KILL "$rp" 2>/dev/null
  fi
  [ -n "${TAIL_PID:-}" ] && kill "$TAIL_PID" 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "pgb-suite: kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SRC="$WORK/src"
mkdir -p "$SRC" "$WORK/tmp" "$WORK/bt"
git --git-dir="$PGB_REPO" archive "$REV" test include pyproject.toml | tar -x -C "$SRC" \
  || die "git archive of test/ include/ pyproject.toml failed"
[ -f "$SRC/test/conftest.py" ] || die "no test/conftest.py at $REV"

# utils.py detects TLS/LDAP support from ../config.mak (an autotools build)
VERSION_OUT="$("${AS[@]}" "$BOUNCER_EXE" --version 2>&1 | head -20)"
if [ -z "${PGB_TLS:-}" ]; then
  if printf '%s\n' "$VERSION_OUT" | grep -Eqi '^tls: ' \
     && ! printf '%s\n' "$VERSION_OUT" | grep -Eqi '^tls: *(unsupported|no|none|disabled)'; then
    PGB_TLS=yes
  else
    PGB_TLS=no
  fi
fi
printf 'tls_support = %s\nldap_support = %s\n' "$PGB_TLS" "${PGB_LDAP:-no}" > "$SRC/config.mak"

# RUN_USER may not be able to read this checkout (e.g. under /root): use a copy
cp "$HERE/reaper.py" "$WORK/reaper.py"
[ "$(id -u)" = 0 ] && chown -R "$RUN_USER" "$WORK"

# --- pytest ----------------------------------------------------------------------
ARGS=(-p no:cacheprovider -q -rN "--timeout=$TIMEOUT" "--basetemp=$WORK/bt"
      "--junitxml=$WORK/junit.xml" -o junit_family=xunit2 -o junit_logging=no
      -o asyncio_default_fixture_loop_scope=function)
[ "$WORKERS" != 0 ] && ARGS+=(-n "$WORKERS")
[ -n "${K:-}" ] && ARGS+=(-k "$K")
for f in ${IGNORE:-}; do ARGS+=("--ignore=$SRC/test/${f#test/}"); done
# test paths must be absolute: utils.py chdirs into test/, which confuses
# pytest-xdist's workers about relative ones
SEL=0
for a in "$@"; do
  case "$a" in
    test/*|test) ARGS+=("$SRC/$a"); SEL=1 ;;
    test_*.py*) ARGS+=("$SRC/test/$a"); SEL=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
[ "$SEL" = 1 ] || ARGS+=("$SRC/test")

echo "pgb-suite: PgBouncer suite @ ${REV:0:12}; BOUNCER_EXE=$BOUNCER_EXE ($(printf '%s' "$VERSION_OUT" | head -1)); tls=$PGB_TLS; user=$RUN_USER; workers=$WORKERS" >&2

OUTFILE="$WORK/pytest.out"
RUNENV=(env "PATH=$PG_BINDIR:$VENV/bin:/usr/local/bin:/usr/bin:/bin"
        "BOUNCER_EXE=$BOUNCER_EXE" "TMPDIR=$WORK/tmp" "PYTHONDONTWRITEBYTECODE=1"
        "HOME=$WORK/tmp" "PYTHONIOENCODING=utf8")
START=$(date +%s)
: > "$OUTFILE"
TAIL_PID=""
if [ "${VERBOSE:-0}" = 1 ]; then tail -n +1 -f "$OUTFILE" & TAIL_PID=$!; fi
RUNNING=1
( cd "$SRC" && exec "${AS[@]}" "${RUNENV[@]}" "REAPER_PIDFILE=$REAPER_PIDFILE" \
    "$VENV/bin/python" "$WORK/reaper.py" "$OVERALL_TIMEOUT" -- \
    "$VENV/bin/python" -m pytest "${ARGS[@]}" >> "$OUTFILE" 2>&1 ) &
wait $!
PYTEST_RC=$?
RUNNING=0
END=$(date +%s)
if [ -n "$TAIL_PID" ]; then sleep 1; kill "$TAIL_PID" 2>/dev/null; wait "$TAIL_PID" 2>/dev/null; TAIL_PID=""; fi

[ -n "${LOG:-}" ] && cp "$OUTFILE" "$LOG"
if [ "${VERBOSE:-0}" != 1 ]; then
  echo "---- pytest output (tail) ----"
  grep -v '^reaper:' "$OUTFILE" | grep -v '^ *$' | tail -n 2
  grep '^reaper:' "$OUTFILE" | head -20
  echo "------------------------------"
fi
echo "pgb-suite: pytest exit $PYTEST_RC after $((END - START))s"
[ "$PYTEST_RC" = 124 ] && echo "pgb-suite: WARNING overall bound ${OVERALL_TIMEOUT}s hit; counts are partial"

[ -n "${JUNIT:-}" ] && [ -f "$WORK/junit.xml" ] && cp "$WORK/junit.xml" "$JUNIT"
if [ -n "${FAILED_LIST:-}" ]; then
  "$VENV/bin/python" "$HERE/summarize.py" "$WORK/junit.xml" "$FAILED_LIST"
else
  "$VENV/bin/python" "$HERE/summarize.py" "$WORK/junit.xml"
fi
# pytest: 0 all passed, 1 some failed, 5 nothing collected; others = harness trouble
case "$PYTEST_RC" in 0|1|5) exit 0 ;; *) exit 2 ;; esac
