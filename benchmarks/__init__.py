"""Benchmarks: ratios against reference peers measured side by side (see docs/performance.md)."""
