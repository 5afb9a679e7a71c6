"""The pgmux daemon: one module per object (client, server, pool, ...)."""
