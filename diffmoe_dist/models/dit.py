"""DiffMoE: a class-conditional DiT whose odd-indexed blocks (1, 3, 5, ...) have an MoE FFN.

forward(x [B, C, H, W], t [B], y [B] long with null class = num_classes) -> [B, C_out, H, W].
What t and the output mean is the objective's business (transport/objective.py): rectified flow
gives t in [0, 1] and reads a velocity (C_out = C); DDPM gives the integer step and reads eps plus
the variance values (C_out = 2C, ``out_channels``). The model never draws random numbers and never
talks to torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.utils.checkpoint

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.models.blocks import DiTBlock, FinalLayer
from diffmoe_dist.models.embeddings import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
)
from diffmoe_dist.models.moe import FeedForward, MoELayer, MoEStats


class DiffMoE(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig, out_channels: int | None = None):
        super().__init__()
        self.model_cfg, self.moe_cfg = model, moe
        D = model.hidden_size
        hidden = int(D * model.mlp_ratio)
        self.in_channels = model.in_channels
        # None: as many as the input (flow); 2C for DDPM's learned variance (DiT's learn_sigma).
        self.out_channels = out_channels or model.in_channels
        self.patch_size, self.num_classes = model.patch_size, model.num_classes
        self.x_embedder = PatchEmbed(model.input_size, model.patch_size, model.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(model.num_classes, D)
        T = self.x_embedder.num_patches
        # Fixed sin-cos positions kept as a frozen parameter, as in DiT (the paper's counts include it).
        self.pos_embed = nn.Parameter(torch.zeros(1, T, D), requires_grad=False)
        blocks = []
        for i in range(model.depth):
            if moe.mode != "dense" and i % 2 == 1:
                ffn: nn.Module = MoELayer(
                    D,
                    hidden,
                    moe.num_experts,
                    mode=moe.mode,
                    capacity=moe.capacity,
                    pool_samples=moe.pool_samples,
                    predictor=moe.predictor,
                    threshold_decay=moe.threshold_decay,
                    layer_id=i,
                )
                if moe.mode != "dense":
                    ffn.experts.use_grouped_mm = moe.grouped_mm
            else:
                ffn = FeedForward(D, hidden)
            blocks.append(DiTBlock(D, model.num_heads, ffn, norm_impl=model.norm_impl))
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(
            D, model.patch_size, self.out_channels, norm_impl=model.norm_impl
        )
        self.checkpoint_blocks = False  # train.activation_checkpointing=blocks (set by the trainer)
        self.initialize_weights()
        if any(True for _ in self.moe_layers()):
            self.set_inference(moe.infer_mode, moe.infer_capacity, moe.gamma)

    def initialize_weights(self) -> None:
        # Linear layers: xavier-uniform, zero bias (DiT); experts do the same per expert slice.
        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # Patch embedding like a Linear layer (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Label table and timestep MLP: N(0, 0.02), as DiT.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            # adaLN-Zero: every block starts as the identity.
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if isinstance(block.ffn, MoELayer) and block.ffn.mode != "dense":
                # Router N(0, 0.006) (DiffMoE), kept out of the generic xavier init.
                nn.init.normal_(block.ffn.router.weight, std=0.006)
                block.ffn.experts.reset_parameters()
        # Zero output layer: the initial prediction is 0.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]
        for block in self.blocks:
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                # activation checkpointing: keep only the block's input, recompute it in backward
                # (an MoE block re-runs its routing and all-to-alls, identically, in backward)
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # [B, T, D]
        x = self.final_layer(x, c)  # [B, T, p*p*C]
        return self.unpatchify(x)  # [B, C_out, H, W]

    # ------------------------------------------------------------------------------------------------
    def moe_layers(self) -> Iterator[MoELayer]:
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                yield block.ffn

    def moe_stats(self) -> list[MoEStats]:
        return [layer.stats for layer in self.moe_layers()]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Losses left by the last forward: predictor BCE summed over layers, tc balance loss summed."""
        zero = self.pos_embed.new_zeros(())
        cp = [s.cp_loss for s in self.moe_stats() if s.cp_loss is not None]
        bal = [s.balance_loss for s in self.moe_stats() if s.balance_loss is not None]
        return {
            "cp_loss": torch.stack(cp).sum() if cp else zero,
            "balance_loss": torch.stack(bal).sum() if bal else zero,
        }

    def set_train_capacity(self, capacity: float) -> None:
        """Training capacity C of the coming forwards (moe.capacity_schedule); k follows it."""
        if not capacity > 0:
            raise ValueError(f"training capacity must be > 0, got {capacity}")
        for layer in self.moe_layers():
            layer.capacity = float(capacity)

    def set_inference(self, rule: str, capacity: float = 1.0, gamma: float = 0.4) -> None:
        for layer in self.moe_layers():
            layer.set_inference(rule, capacity, gamma)

    def c_infer(self) -> tuple[list[float], float]:
        """Realised capacity of the last forward, per MoE layer and averaged over layers."""
        per = [s.capacity for s in self.moe_stats()]
        return per, (sum(per) / len(per) if per else 1.0)
