"""The model as if there were one device: no torch.distributed in this package.

    dit.py          DiffMoE: the DiT backbone with an MoE FFN in every other block
    blocks.py       adaLN-Zero DiT block (dense FFN or MoE), final layer
    embeddings.py   patch, timestep, label (null class), 2D sin-cos positions
    moe.py          router, routing modes, capacity predictor, stacked experts, local dispatcher
    routing.py      top-k / k-th largest / token choice primitives
    registry.py     named sizes (DiffMoE-S/B/L/XL-E*, Dense-DiT-*, TC/EC-DiT) as config sections
    params.py, flops.py, capacity_schedule.py

Import the submodules directly; this package imports nothing, so that config.py can import the
routing names of moe.py and the registry without pulling in dit.py (which imports config.py).
"""
