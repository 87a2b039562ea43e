"""The side-by-side benchmark suite; run from the repository root as ``python -m bench.suite``."""
