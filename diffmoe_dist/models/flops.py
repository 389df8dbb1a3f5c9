"""Model FLOPs of DiffMoE, for achieved TFLOP/s and MFU (model FLOPs utilisation).

Counted: every matmul of the model as it is defined (multiply-add = 2 FLOPs): patch embedding,
timestep MLP, per block adaLN, qkv, attention scores and values, output projection, the FFN (dense)
or the MoE FFN (router, capacity predictor, and the (token, expert) pairs that the *training* routing
processes: exactly k per expert and pool for diffmoe / ec, one per token for tc), and the final layer.
Not counted: norms, activations, softmax, top-k, gathers (the usual convention). Uneven expert counts
run exact per-expert matmuls (models/moe.py), so executed matmul FLOPs equal these model FLOPs.

Under ``moe.capacity_schedule`` the capacity (hence k and the expert FLOPs) changes per step; the
trainer counts each step with ``train_flops_per_sample(model, moe_at_step(moe, step))``
(models/capacity_schedule.py), so tflops_per_rank and mfu follow the schedule.

Training FLOPs per sample = 3 x forward (backward = input gradient + weight gradient), the PaLM /
Megatron convention; the capacity predictor's and patch embedding's missing input gradients are
ignored (under 1% of a step). ``tests/test_flops.py`` checks the forward count against
``torch.utils.flop_counter.FlopCounterMode`` on real models of every mode.
"""

from __future__ import annotations

import re

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.models.moe import MOE_MODES, ROUTING_MODES
from diffmoe_dist.models.routing import capacity_k

FREQ_EMBED = 256  # TimestepEmbedder's sinusoidal frequency size
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, per (family, form factor) from NVIDIA's data
# sheets: the NVL and PCIe boards run lower clocks / power than SXM. Half of the "with sparsity"
# figures: H100 NVL and H200 NVL 1671 TFLOP/s sparse -> 835.5 dense.
PEAK_BF16 = {
    ("H100", "SXM"): 989.4e12,
    ("H100", "PCIE"): 756.0e12,
    ("H100", "NVL"): 835.5e12,
    ("H200", "SXM"): 989.4e12,
    ("H200", "NVL"): 835.5e12,
    ("GH200", "SXM"): 989.4e12,
    ("A100", "SXM"): 312.0e12,
    ("A100", "PCIE"): 312.0e12,
}
# Name words that say nothing about the peak (memory size and type, the SXM generation).
_NEUTRAL_WORD = re.compile(r"^(\d+GB|HBM\d*E?|SXM\d*|NVIDIA|TESLA)$")


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU from its CUDA device name, else None.

    "NVIDIA H100 80GB HBM3" -> H100 SXM, "NVIDIA H100 NVL" -> H100 NVL, "NVIDIA A100-PCIE-40GB" ->
    A100 PCIe. A name with any other word (a variant this table does not know) gives None rather than
    a wrong peak: set train.peak_tflops for it.
    """
    words = [w for w in re.split(r"[\s\-_]+", device_name.upper()) if w]
    family = [w for w in words if (w, "SXM") in PEAK_BF16 or (w, "PCIE") in PEAK_BF16]
    if len(family) != 1:
        return None
    forms = [w for w in words if w in ("PCIE", "NVL")]
    other = [w for w in words if w not in family and w not in forms and not _NEUTRAL_WORD.match(w)]
    if other or len(forms) > 1:
        return None
    return PEAK_BF16.get((family[0], forms[0] if forms else "SXM"))


def moe_pairs_per_token(moe: MoEConfig, tokens_per_sample: int) -> float:
    """(token, expert) pairs per token that one MoE layer processes in training."""
    E, T = moe.num_experts, tokens_per_sample
    if moe.mode == "tc":
        return 1.0
    if moe.mode == "ec":
        return capacity_k(T, moe.capacity, E) * E / T
    if moe.mode == "diffmoe":
        S = moe.pool_samples * T
        return capacity_k(S, moe.capacity, E) * E / S
    raise ValueError(f"moe.mode={moe.mode!r} has no experts")


def ffn_forward_flops_per_token(
    mode: str,
    dim: int,
    hidden: int,
    num_experts: int = 0,
    pairs: float = 1.0,
    predictor: bool = True,
) -> dict[str, float]:
    """Forward FLOPs per token of one FFN layer, by part.

    dense: {"ffn"}; an MoE layer: {"experts", "router"} (+ {"predictor"} for diffmoe with a capacity
    predictor), ``pairs`` = (token, expert) pairs per token (``moe_pairs_per_token``). Expert FFN
    D -> hidden -> D: 4 D hidden per pair; router Linear(D, E); predictor Linear(D, D) -> Linear(D, E).
    """
    ffn = 4.0 * dim * hidden
    if mode == "dense":
        return {"ffn": ffn}
    if mode not in MOE_MODES:
        raise ValueError(f"moe.mode={mode!r}; expected one of {ROUTING_MODES}")
    parts = {"experts": ffn * pairs, "router": 2.0 * dim * num_experts}
    if mode == "diffmoe" and predictor:
        parts["predictor"] = 2.0 * dim * dim + 2.0 * dim * num_experts
    return parts


def forward_flops_per_sample(model: ModelConfig, moe: MoEConfig) -> dict[str, float]:
    """Forward FLOPs of one sample, by part, and their ``total`` (see the module docstring)."""
    if model.input_size % model.patch_size:
        raise ValueError(
            f"model.input_size={model.input_size} is not a multiple of patch_size={model.patch_size}"
        )
    D, L = model.hidden_size, model.depth
    H = int(D * model.mlp_ratio)
    T = (model.input_size // model.patch_size) ** 2
    patch = model.patch_size**2 * model.in_channels
    n_moe = L // 2 if moe.mode != "dense" else 0  # odd-indexed blocks carry the MoE FFN
    parts = {
        "embed": 2.0 * T * patch * D + 2.0 * (FREQ_EMBED * D + D * D),
        "adaln": L * 2.0 * D * 6 * D + 2.0 * D * 2 * D,
        "attention": L * (2.0 * T * D * 3 * D + 4.0 * T * T * D + 2.0 * T * D * D),
        "ffn": (L - n_moe) * T * ffn_forward_flops_per_token("dense", D, H)["ffn"],
        "experts": 0.0,
        "router": 0.0,
        "predictor": 0.0,
        "final": 2.0 * T * D * patch,
    }
    if n_moe:
        pairs = moe_pairs_per_token(moe, T)
        layer = ffn_forward_flops_per_token(
            moe.mode, D, H, moe.num_experts, pairs, predictor=moe.predictor
        )
        for k, v in layer.items():
            parts[k] = n_moe * T * v
    parts["total"] = sum(parts.values())
    return parts


def train_flops_per_sample(model: ModelConfig, moe: MoEConfig) -> float:
    """Forward + backward model FLOPs of one training sample (3 x forward)."""
    return 3.0 * forward_flops_per_sample(model, moe)["total"]
