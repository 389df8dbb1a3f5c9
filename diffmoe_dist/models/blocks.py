"""adaLN-Zero DiT block (dense FFN or MoE FFN) and the final layer.

Shapes: tokens x [B, T, D], conditioning c [B, D] (timestep + label embedding).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmoe_dist.models.moe import MoELayer

log = logging.getLogger(__name__)
_APEX_REPORTED = False


def make_layernorm(
    dim: int, impl: str = "torch", affine: bool = False, eps: float = 1e-6
) -> nn.Module:
    """LayerNorm; ``impl='apex'`` uses NVIDIA apex's FusedLayerNorm where importable, else torch's."""
    global _APEX_REPORTED
    if impl == "apex":
        try:
            from apex.normalization import FusedLayerNorm  # type: ignore[import-not-found]

            return FusedLayerNorm(dim, eps=eps, elementwise_affine=affine)
        except Exception as e:  # apex absent (CPU, PyPI) or broken: the torch path is the fallback
            if not _APEX_REPORTED:
                log.warning(
                    "model.norm_impl=apex but apex is not usable (%s); using torch LayerNorm", e
                )
                _APEX_REPORTED = True
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # [B, T, 3, h, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, T, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, T, d]
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    """x + gate * Attn(modulate(LN(x))); x + gate * FFN(modulate(LN(x))); FFN dense or MoE."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, norm_impl: str = "torch"):
        super().__init__()
        self.norm1 = make_layernorm(dim, norm_impl)
        self.attn = Attention(dim, num_heads)
        self.norm2 = make_layernorm(dim, norm_impl)
        self.ffn = ffn
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x, h, gate_f = self.attn_half(x, c)  # [B, T, D], [B, T, D], [B, D]
        return x + gate_f.unsqueeze(1) * self.ffn(h)  # [B, T, D]

    def attn_half(
        self, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before the FFN: (x after the attention residual, the FFN's input, its gate).

        A separate method so that train.compile can compile it on an MoE block while routing and
        the dispatcher's collectives stay eager (parallel/parallelize.py apply_compile).
        """
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_a.unsqueeze(1) * self.attn(
            modulate(self.norm1(x), shift_a, scale_a)
        )  # [B, T, D]
        return x, modulate(self.norm2(x), shift_f, scale_f), gate_f


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int, norm_impl: str = "torch"):
        super().__init__()
        self.norm_final = make_layernorm(dim, norm_impl)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, T, p*p*C]
