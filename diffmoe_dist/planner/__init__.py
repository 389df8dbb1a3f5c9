"""The cluster planner: a cost model of a DiffMoE training layout, and its check against bench_step.

cost_model.py  predicted step time, all-to-all share and memory per GPU of a layout
check.py       the cost model calibrated on this machine against a measured ``tools/bench_step.py``
"""
