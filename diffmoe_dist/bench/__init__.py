"""Benchmarks (print a table or --json): one MoE layer (moe_bench) and the whole training step (step_bench)."""
