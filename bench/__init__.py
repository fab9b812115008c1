"""Benchmarks: the serving benchmark and the GPU pipeline benchmark."""
