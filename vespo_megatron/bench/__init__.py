"""Benchmarks behind ``vespo-megatron bench <what>``; each module exposes ``main(argv) -> int``."""
