"""Input embeddings of the DiT: patches, timestep, class label (with a null class), 2-D positions.

Time: whatever the objective gives (transport/objective.py), used as is in the sinusoidal embedding:
rectified flow's raw t in [0, 1] (t = 0 noise, t = 1 data; not t x 1000), or DDPM's integer step
0..999 (as DiT). Label dropout for classifier-free guidance is decided
by the trainer (deterministically per sample) and arrives here as the null label ``num_classes``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, T, D] with T = (H / p) * (W / p), one token per p x p patch."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, T, D]


class TimestepEmbedder(nn.Module):
    """Scalar t per sample -> [B, D] via sinusoidal features and a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]  # [B, half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label -> [B, D]; row ``num_classes`` is the learned null class used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # Checked here at inference on CPU labels; in training the trainer checks each batch's labels
        # on the host before they move to the device. On a GPU, int(y.min()) would stop the host
        # every forward: there the embedding lookup's own device-side assert catches a bad label.
        if (
            not self.training
            and y.device.type == "cpu"
            and y.numel()
            and (int(y.min()) < 0 or int(y.max()) > self.num_classes)
        ):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got min {int(y.min())}, max {int(y.max())}"
            )
        return self.embedding_table(y)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions as in MAE / DiT: [grid_size**2, embed_dim]."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in the DiT code
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
