"""Benchmarks: `python -m benchmarks.run` measures goinfer end to end; see README.md here."""
