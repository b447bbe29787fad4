"""Operations: Prefect glue, cache keys, preflight checks, servers and processes, recovery."""
