"""llamad benchmarks: `scripts/bench` runs them all (see bench/run.py)."""
