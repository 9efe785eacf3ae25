"""Benchmarks for pinhole (see bench/README.md)."""
