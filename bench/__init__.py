"""Benchmarks: figures printed (and written as JSON), never asserted.

Every figure sits beside a baseline measured in the same run on the same model, because these
machines are shared and noisy: a ratio means something, a single absolute time does not.
Run `python -m bench --help`.
"""
