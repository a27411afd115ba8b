"""Benchmarks (run each as `python bench/NAME.py` from the repository root); limits.py is their shared math."""
