"""Write the generated demo dataset (videos, images, conversations in every mode, RL prompts, eval fixtures).

Usage: python tools/make_sample_data.py OUT_DIR [--images N] [--seed S]
"""

from __future__ import annotations

import argparse

from data_pipelines.sample_data import make_sample_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--images", type=int, default=12, help="number of shape images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = make_sample_data(args.out, n_images=args.images, seed=args.seed)
    print(f"{report.root}: {report.summary()}")


if __name__ == "__main__":
    main()
