"""Weight-average several HF-format Keye checkpoints into a new one (logic in ``keye.merge``).

    python tools/merge_checkpoints.py CKPT_A CKPT_B [CKPT_C …] --out DIR [--weights 0.5 0.3 0.2]

Prints one JSON line (``out``, ``sources``, ``weights``, ``tensors``, ``parameters``, ``shards``). A checkpoint
with a different architecture, different tensor names or shapes is rejected with the offending names.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from keye.merge import DEFAULT_SHARD_BYTES, MergeError, merge_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="HF-format checkpoint directories (the first gives the files)")
    parser.add_argument("--out", required=True, help="new checkpoint directory (must be empty or absent)")
    parser.add_argument("--weights", type=float, nargs="+", help="one per checkpoint, normalised to sum to 1")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        report = merge_checkpoints(args.checkpoints, args.out, args.weights, int(args.max_shard_gb * 2**30))
    except (MergeError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
