"""Benchmarks: plain scripts that print a table (run with .venv/bin/python bench/<name>.py)."""
