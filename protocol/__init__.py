"""Sans-IO PostgreSQL v3 wire protocol: bytes in, messages and events out."""
