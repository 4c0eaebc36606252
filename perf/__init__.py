"""The perf suite (pytest-benchmark, see README.md here) and its report (`python -m perf.report`).

A regular package so `python -m perf.report` finds this folder rather than any other `perf` on sys.path.
The test modules still `import timing` as a top-level module (conftest.py puts perf/ on sys.path).
"""
