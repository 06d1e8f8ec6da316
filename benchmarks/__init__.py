"""Speed and memory comparisons, each against a baseline measured in the same run.

Every ``bench_*.py`` module here exposes ``main() -> None`` that prints one line per
comparison through :func:`benchmarks.common.report`.  ``make bench`` runs them all.
"""
