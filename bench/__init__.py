"""Benchmarks, one module per op (`python -m bench.<name>`) plus `python -m bench.all`.

Every bench times all its peers in one process, prints a table, then appends JSON lines to
`bench/results/<name>.jsonl` (see `bench.common`).
"""
