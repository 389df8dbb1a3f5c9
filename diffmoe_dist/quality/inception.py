"""The FID Inception network: torch-fidelity's ``FeatureExtractorInceptionV3`` with local weights.

torch-fidelity's extractor is a pure-torch port of the TensorFlow Inception graph that ADM's
evaluator and the original FID use (same resize, same normalisation, 2048-d pool3 features, 1008
logits). The ``torch_fidelity`` package itself imports torchvision at import time (for its CLIP / VGG
extractors and its dataset helpers), and the PyPI torchvision does not load beside every torch build
(``operator torchvision::nms does not exist``). The Inception module needs none of that, so when the
package cannot be imported we load only the submodules it needs (``feature_extractor_base``,
``helpers``, ``interpolate_compat_tensorflow``, ``feature_extractor_inceptionv3``) under a bare
package entry. Install it with ``pip install --no-deps torch-fidelity`` where torchvision is broken.

Weights never download: ``weights`` is a local ``.pth`` state dict
(``weights-inception-2015-12-05-6726825d.pth`` from the torch-fidelity v0.2.0 release), or
``"random"`` for a randomly initialised network (tests: plumbing only, the numbers mean nothing).

Input: uint8 NHWC images (ADM .npz convention) or uint8 NCHW tensors, any size (resized to 299 inside).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

FEATURES = ("2048", "logits_unbiased")  # pool3 features (FID, precision/recall), logits (IS)
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def _inception_module() -> Any:
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    # ImportError, or e.g. RuntimeError from a torchvision built for another torch
    except Exception as first:
        stale = [m for m in sys.modules if m.split(".")[0] == "torch_fidelity"]
        for name in stale:
            sys.modules.pop(name)  # drop the half-imported package
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                "torch-fidelity is not installed: pip install -c constraints.txt --no-deps "
                "torch-fidelity==0.4.0"
            ) from first
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)  # submodules only, no __init__
        sys.modules["torch_fidelity"] = pkg
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def build_inception(weights: str | os.PathLike[str], device: torch.device | str = "cpu") -> Any:
    """The feature extractor with ``weights`` (a local .pth) or ``"random"`` (seeded random init)."""
    mod = _inception_module()

    class _Inception(mod.FeatureExtractorInceptionV3):  # type: ignore[name-defined,misc]
        def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            if state_dict is None:  # random initialisation requested (see below)
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    if str(weights) == "random":
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            none_file = Path(d) / "none.pth"
            torch.save(None, none_file)  # torch.load gives None -> keep the random init
            net = _Inception("inception-v3-compat", list(FEATURES), str(none_file))
    else:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(
                f"Inception weights {path} not found (download {WEIGHTS_NAME} once from the "
                "torch-fidelity v0.2.0 release; nothing is fetched at run time)"
            )
        try:
            net = _Inception("inception-v3-compat", list(FEATURES), str(path))
        except RuntimeError as e:
            raise ValueError(f"{path} is not a torch-fidelity InceptionV3 state dict: {e}") from e
    return net.to(device).eval()


def check_images(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 [N, H, W, 3] (ADM convention); ValueError naming ``where`` otherwise."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(
            f"{where}: images must be uint8 [N, H, W, 3] (ADM .npz arr_0), got {a.dtype} {a.shape}"
        )
    return a


@torch.no_grad()
def inception_features(
    net: Any,
    images: np.ndarray,
    batch_size: int = 50,
    where: str = "images",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """uint8 NHWC -> {"pool": [N, 2048] float64, "logits": [N, 1008] float64}."""
    a = check_images(images, where)
    device = next(net.parameters()).device
    pools, logits = [], []
    it = range(0, len(a), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"inception {Path(where).name}", unit="batch")
    for s in it:
        x = torch.from_numpy(a[s : s + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
        pool, logit = net(x)
        pools.append(pool.double().cpu().numpy())
        logits.append(logit.double().cpu().numpy())
    return {"pool": np.concatenate(pools), "logits": np.concatenate(logits)}
