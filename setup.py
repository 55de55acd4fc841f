"""Packaging for vespo_megatron: VESPO off-policy RL on Megatron-Core."""

from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent

setup(
    name="vespo-megatron",
    version="0.1.0",
    description=(
        "VESPO (variational sequence-level soft policy optimization) RL for dense and MoE GPT models "
        "on Megatron-Core, on GPU clusters (nccl) and CPU boxes (gloo)"
    ),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_namespace_packages(include=["vespo_megatron", "vespo_megatron.*"]),
    package_data={"vespo_megatron": ["assets/*"]},
    include_package_data=True,
    install_requires=[
        "megatron-core>=0.19.2,<0.20",
        "torch>=2.6",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "psutil>=5.9",  # megatron dist-checkpointing needs it but does not declare it
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        # NVIDIA apex is an optional from-source install (see docs/parallelism.md); the PyPI
        # package named "apex" is unrelated and must never be installed.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # Real models in and out (docs/models.md). Megatron-Bridge itself is installed with --no-deps
        # (launch/setup_env.sh): its declared dependencies include GPU-only builds (mamba-ssm); these are
        # the packages it imports on the paths we use, plus transformers for HF tokenizers.
        "hf": [
            # Megatron-Bridge 0.6.2 imports transformers.modeling_attn_mask_utils, gone in later 5.x releases.
            "transformers==5.12.1",
            "safetensors>=0.4",
            "accelerate>=1.0",
            "einops>=0.7",
            "omegaconf>=2.3",
            "hydra-core>=1.3",
            "rich>=13.0",
        ],
        "test": ["pytest>=8.0", "pytest-timeout>=2.2"],
        "wandb": ["wandb>=0.16"],
    },
    entry_points={"console_scripts": ["vespo-megatron=vespo_megatron.cli:main"]},
)
