"""Executions per second of the Thyme sandbox: cold starts vs. a warm worker pool vs. blocks in one session.

Each "trajectory" runs one crop block on a generated 640x480 image (the typical Thyme call). ``cold`` starts a
jail per trajectory (pool_size=0); ``warm`` takes pre-started workers from the pool; ``session`` runs every block
in one worker (notebook reuse, the per-block floor). ``warm`` counts only time on the rollout's critical path:
the wait for the pool to refill is excluded, as that overlaps with generation in a real rollout. Run: ``python tools/bench_sandbox.py [--n 20] [--pool 2]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PIL import Image

from keye.sandbox import Sandbox, SandboxConfig

CODE = (
    "im = Image.open(image_path)\n"
    "crop = im.crop((100, 100, 400, 300)).resize((600, 400))\n"
    "processed_path = os.path.join(temp_output_dir, 'crop.png')\n"
    "crop.save(processed_path)\n"
    "print(processed_path)"
)


def bench(mode: str, n: int, pool: int, image: str, out_dir: str) -> float:
    cfg = SandboxConfig(pool_size=pool if mode == "warm" else 0)
    with Sandbox(cfg) as sandbox:
        if mode == "warm":
            sandbox.wait_warm(120)
        start = time.perf_counter()
        if mode == "session":
            with sandbox.session() as session:
                results = [session.run(CODE, [image], out_dir) for _ in range(n)]
        else:
            results, waited = [], 0.0
            for _ in range(n):
                if mode == "warm":  # the pool refills in the background, as it would while the model generates
                    t = time.perf_counter()
                    sandbox.wait_warm(120)
                    waited += time.perf_counter() - t
                results.append(sandbox.run(CODE, [image], out_dir))
        elapsed = time.perf_counter() - start
        if mode == "warm":
            elapsed -= waited  # time on the rollout's critical path only
    bad = [r for r in results if r.status != "ok" or len(r.images) != 1]
    if bad:
        raise RuntimeError(f"{mode}: {len(bad)} of {n} blocks failed, first: {bad[0]}")
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="trajectories (or blocks) per mode")
    parser.add_argument("--pool", type=int, default=2, help="warm pool size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = str(Path(tmp) / "in.png")
        Image.new("RGB", (640, 480), (120, 30, 200)).save(image)
        rates = {
            mode: bench(mode, args.n, args.pool, image, str(Path(tmp) / mode)) for mode in ("cold", "warm", "session")
        }
    if args.json:
        print(json.dumps(rates))
        return
    for mode, rate in rates.items():
        print(f"{mode:8s} {rate:7.2f} executions/s  ({1000 / rate:6.1f} ms each)")


if __name__ == "__main__":
    main()
