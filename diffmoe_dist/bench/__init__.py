"""Instruments: the MoE layer benchmark (moe_bench) and the cluster planner (planner)."""
