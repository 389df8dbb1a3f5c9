"""Real 8x8 handwritten digits (scikit-learn's bundled ``load_digits``, 1797 images, 10 classes).

Small enough to train a DiffMoE end to end on CPU in minutes, real enough that a generated sample
can be judged. No download: the data ships inside scikit-learn.

Shapes and values: images float32 [N, 1, H, W] in [-1, 1] (raw pixel values 0..16 mapped
linearly, then resized bilinearly to ``image_size``; bilinear weights are convex so the range is
kept); labels int64 [N] in 0..9.

Held-out split: every 10th image of sklearn's order (original index % 10 == 9) is "heldout"
(179 images), the rest is "train" (1618). Deterministic, disjoint, and roughly class-balanced
because sklearn's order cycles through writers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmoe_dist.data.sampler import validate_batch_request

SPLITS = ("train", "heldout", "all")
HELDOUT_EVERY = 10
_RAW_MAX = 16.0  # load_digits pixel values are integers 0..16


def digits_split_indices(split: str, num_total: int = 1797) -> torch.Tensor:
    """Original sklearn indices belonging to ``split``: LongTensor, increasing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    idx = torch.arange(num_total, dtype=torch.long)
    if split == "all":
        return idx
    heldout = idx % HELDOUT_EVERY == HELDOUT_EVERY - 1
    return idx[heldout] if split == "heldout" else idx[~heldout]


class DigitsDataset:
    """In-memory digits with the ``get_batch(indices, flip)`` API shared by all datasets here."""

    num_classes: int = 10
    channels: int = 1

    def __init__(self, image_size: int = 16, split: str = "train") -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"image_size must be an int >= 2, got {image_size!r}")
        # Imported here so that importing the package does not pull scikit-learn in.
        from sklearn.datasets import load_digits

        raw = load_digits()
        images = torch.as_tensor(raw.images, dtype=torch.float32)  # [1797, 8, 8], 0..16
        labels = torch.as_tensor(raw.target, dtype=torch.long)  # [1797]
        self.source_indices = digits_split_indices(split, images.shape[0])
        images = images[self.source_indices].unsqueeze(1)  # [N, 1, 8, 8]
        images = images / _RAW_MAX * 2.0 - 1.0  # [-1, 1]
        if image_size != images.shape[-1]:
            images = F.interpolate(
                images,
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
                antialias=image_size < images.shape[-1],
            )
            # Antialiased downsampling can overshoot by rounding; keep the documented range.
            images = images.clamp_(-1.0, 1.0)
        self.images = images.contiguous()  # [N, 1, H, W] float32
        self.labels = labels[self.source_indices].contiguous()  # [N] int64
        self.image_size = image_size
        self.split = split

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def get_batch(
        self, indices: torch.Tensor, flip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, 1, H, W] float32 (rows with flip=True mirrored along W), y [n] int64."""
        validate_batch_request(indices, flip, len(self), f"DigitsDataset(split={self.split!r})")
        x = self.images.index_select(0, indices)  # copy, safe to modify
        if bool(flip.any()):
            x[flip] = x[flip].flip(-1)
        return x, self.labels.index_select(0, indices)
