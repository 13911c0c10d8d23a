"""Benchmarks: numbers measured as ratios to an anchor taken in the same run."""
