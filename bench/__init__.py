"""relay's benchmark harness: `python -m bench.run [--quick]` (`make bench`, `make bench-quick`)."""
