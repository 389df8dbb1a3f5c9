"""The image <-> latent autoencoder: a diffusers ``AutoencoderKL`` loaded from a local directory.

Convention (as in DiT / DiffMoE): images are float [N, 3, H, W] in [-1, 1]; latents the model sees
are ``VAE latent x scale_factor`` (0.18215 for sd-vae-ft-mse), [N, 4, H/8, W/8]. ``encode`` returns
model-ready latents, ``decode`` takes them and divides by the scale itself.

Nothing is downloaded: the directory must hold ``config.json`` and the weights
(``diffusion_pytorch_model.safetensors`` or ``.bin``), e.g. a ``save_pretrained`` of
``stabilityai/sd-vae-ft-mse`` made once on a machine with network access.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffmoe_dist.data.latents import SD_VAE_SCALE_FACTOR

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
POSTERIORS = ("sample", "mean")  # how encode() turns the encoder's Gaussian into a latent


def load_vae(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """AutoencoderKL from a local diffusers directory, in eval mode; ValueError names what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(
            f"VAE directory {root} does not exist (give a local diffusers AutoencoderKL)"
        )
    if not (root / "config.json").is_file():
        raise ValueError(
            f"VAE directory {root} has no config.json (not a diffusers model directory)"
        )
    if not any((root / w).is_file() for w in _WEIGHT_FILES):
        raise ValueError(f"VAE directory {root} has no weights file (one of {list(_WEIGHT_FILES)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local path never needs the hub
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype)
    except Exception as e:  # diffusers raises many types; the user needs the path
        raise ValueError(f"cannot load AutoencoderKL from {root}: {e}") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(
    vae: Any,
    images: torch.Tensor,
    scale_factor: float = SD_VAE_SCALE_FACTOR,
    posterior: str = "sample",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] -> latents x scale_factor [N, C, h, w] (float32).

    ``posterior="sample"`` draws from the encoder's Gaussian (DiT/fast-DiT's choice), seeded by
    ``generator``; ``"mean"`` takes its mean (deterministic without a generator).
    """
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior must be one of {', '.join(POSTERIORS)}, got {posterior!r}")
    p = next(vae.parameters())
    dist = vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
    z = dist.mean if posterior == "mean" else dist.sample(generator=generator)
    return (z * scale_factor).float()


@torch.no_grad()
def decode(
    vae: Any, latents: torch.Tensor, scale_factor: float = SD_VAE_SCALE_FACTOR
) -> torch.Tensor:
    """latents x scale_factor [N, C, h, w] -> images [N, 3, H, W] in [-1, 1] (float32, clamped)."""
    p = next(vae.parameters())
    x = vae.decode(latents.to(device=p.device, dtype=p.dtype) / scale_factor).sample
    return x.float().clamp(-1, 1)


def make_tiny_vae(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """A randomly initialised 2-level AutoencoderKL (downsampling x2, 4 latent channels), saved with
    ``save_pretrained`` to ``out_dir``: the test and smoke-run stand-in for sd-vae-ft-mse."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(str(out_dir))
    return Path(out_dir)
