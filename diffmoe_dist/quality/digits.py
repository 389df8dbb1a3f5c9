"""The embedded quality metric for the digits job: a small classifier trained once, deterministically.

An MLP (scikit-learn, one hidden layer of 64 ReLU units, fixed seed) is fitted on the training split
of the 8x8 digits. It gives two numbers for generated samples:
  accuracy  fraction of samples classified as the label they were conditioned on;
  fd        Frechet distance between the hidden-layer features of the samples and of the held-out
            real digits (a FID-style distance in a space that knows what digits look like).
Samples at any resolution are area-resampled to 8x8 and mapped from [-1, 1] back to the 0..16 scale.
The fitted judge is cached (joblib) under $DIFFMOE_CACHE or ~/.cache/diffmoe_dist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffmoe_dist.data.digits import digits_split_indices
from diffmoe_dist.quality.frechet import frechet_distance, gaussian_stats

_VERSION = 1


def _cache_path() -> Path:
    root = Path(os.environ.get("DIFFMOE_CACHE", Path.home() / ".cache" / "diffmoe_dist"))
    import sklearn

    return root / f"digits_judge_v{_VERSION}_sklearn{sklearn.__version__}.joblib"


def to_judge_input(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, 1, H, W] in [-1, 1] (or uint8 NHWC) -> [N, 64] on the digits' 0..16 scale."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:  # NHWC uint8 (npz convention)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.float()
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x.clamp(-1, 1) + 1) * 8.0).reshape(x.shape[0], -1).numpy().astype(np.float64)


@dataclass
class DigitsJudge:
    clf: object  # sklearn MLPClassifier

    @classmethod
    def load_or_fit(cls) -> DigitsJudge:
        import joblib

        path = _cache_path()
        if path.is_file():
            try:
                return cls(joblib.load(path))
            except Exception:  # a corrupt cache is refitted, never trusted
                pass
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier

        d = load_digits()
        train = digits_split_indices("train", len(d.target)).numpy()
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=0)
        clf.fit(d.data[train], d.target[train])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        joblib.dump(clf, tmp)
        os.replace(tmp, path)
        return cls(clf)

    def features(self, x64: np.ndarray) -> np.ndarray:
        """Hidden-layer ReLU activations [N, 64]."""
        w, b = self.clf.coefs_[0], self.clf.intercepts_[0]
        return np.maximum(x64 @ w + b, 0.0)

    def accuracy(self, images: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
        pred = self.clf.predict(to_judge_input(images))
        return float((pred == np.asarray(labels)).mean())

    def heldout_stats(self, image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Reference: the held-out real digits at the model's resolution, through the same transform."""
        from diffmoe_dist.data.digits import DigitsDataset

        ds = DigitsDataset(image_size=image_size, split="heldout")
        x, _ = ds.get_batch(torch.arange(len(ds)), torch.zeros(len(ds), dtype=torch.bool))
        return gaussian_stats(self.features(to_judge_input(x)))

    def fd(self, images: torch.Tensor | np.ndarray) -> float:
        x = torch.as_tensor(images)
        side = x.shape[1] if x.dtype == torch.uint8 else x.shape[-1]
        mu, sigma = gaussian_stats(self.features(to_judge_input(x)))
        return frechet_distance(mu, sigma, *self.heldout_stats(side))

    def evaluate(self, images: torch.Tensor | np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": self.accuracy(images, labels), "fd": self.fd(images)}
