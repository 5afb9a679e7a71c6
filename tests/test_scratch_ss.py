from helpers import connect_asyncpg, close_quietly
async def test_dbg(pgmux):
    mux = pgmux({"pool": {"size": 2, "session_state": "pin"}, "timeouts": {"query_wait": "1s"}})
    a = await connect_asyncpg(mux); b = await connect_asyncpg(mux)
    print("a pid", await a.fetchval("SELECT pg_backend_pid()"))
    print("lock", await a.fetchval("SELECT pg_try_advisory_lock($1)", 9009001))
    print("a pid", await a.fetchval("SELECT pg_backend_pid()"))
    print("b pid", await b.fetchval("SELECT pg_backend_pid()"))
    print("a pid", await a.fetchval("SELECT pg_backend_pid()"))
    print("b pid", await b.fetchval("SELECT pg_backend_pid()"))
    await close_quietly(a, b)
    print(mux.logs())
