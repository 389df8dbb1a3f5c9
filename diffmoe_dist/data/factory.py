"""Config -> dataset (digits embedded in scikit-learn, or pre-extracted latent shards)."""

from __future__ import annotations

from diffmoe_dist.config import Config
from diffmoe_dist.data import BatchDataset, DigitsDataset, LatentShardDataset


def build_dataset(cfg: Config, split: str = "train") -> BatchDataset:
    if cfg.data.name == "digits":
        return DigitsDataset(image_size=cfg.data.image_size, split=split)
    return LatentShardDataset(cfg.data.path, verify=cfg.data.verify)
