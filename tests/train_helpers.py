"""Shared builders for the trainer tests: a nano model YAML, tiny shard sets, run configs, and launching runs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# Narrower than spine_fixtures.micro_config (the vocabulary stays the tokenizer's: 2 × 4.9M parameters).
NANO_MODEL = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
    },
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
    },
    "mrope_section": [2, 3, 3],
    "attn_backend": "sdpa",
}

WORDS = [
    "red",
    "green",
    "blue",
    "square",
    "circle",
    "stripes",
    "dots",
    "left",
    "right",
    "top",
    "bottom",
    "bright",
    "dark",
    "small",
    "large",
]


def caption(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 3))


def write_nano_model(path: Path) -> Path:
    path.write_text(yaml.safe_dump(NANO_MODEL))
    return path


def make_records(media: Path, n_image: int, n_video: int, n_text: int, n_frames: int = 0, seed: int = 0) -> list:
    """Conversation records with their media written under ``media`` (tiny images, tiny mp4s, frame lists)."""
    from data_pipelines import synthetic

    records = []
    for i in range(n_image):
        rel = f"img_{seed}_{i}.png"
        synthetic.write_image(media / rel, height=56, width=56 + 28 * (i % 2), seed=seed * 100 + i)
        records.append(
            {
                "id": f"img-{seed}-{i}",
                "source": "image",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": rel}, {"type": "text", "text": "Describe."}],
                    },
                    {"role": "assistant", "content": caption(i)},
                ],
            }
        )
    for i in range(n_video):
        rel = f"vid_{seed}_{i}.mp4"
        synthetic.moving_shapes(media / rel, seconds=1.0, fps=4.0, height=56, width=56, seed=seed * 100 + i)
        records.append(
            {
                "id": f"vid-{seed}-{i}",
                "source": "video",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video", "video": rel, "max_frames": 2, "min_pixels": 3136, "max_pixels": 3136},
                            {"type": "text", "text": "What moves?"},
                        ],
                    },
                    {"role": "assistant", "content": caption(i + 5)},
                ],
            }
        )
    for i in range(n_frames):
        frames = synthetic.write_frame_images(media / f"frames_{seed}_{i}", num_frames=3, height=56, width=56, seed=i)
        rels = [str(Path(p).relative_to(media)) for p in frames]
        records.append(
            {
                "id": f"frames-{seed}-{i}",
                "source": "video",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "video",
                                "video": rels,
                                "fps": 1.0,
                                "max_frames": 2,
                                "min_pixels": 3136,
                                "max_pixels": 3136,
                            },
                            {"type": "text", "text": "Story?"},
                        ],
                    },
                    {"role": "assistant", "content": caption(i + 9)},
                ],
            }
        )
    for i in range(n_text):
        records.append(
            {
                "id": f"txt-{seed}-{i}",
                "source": "text",
                "messages": [
                    {"role": "user", "content": f"Repeat after me: {caption(i + 2)}"},
                    {"role": "assistant", "content": caption(i + 2)},
                ],
            }
        )
    return records


def write_shard_set(root: Path, name: str, records: list, media: Path, per_shard: int = 1000) -> Path:
    from data_pipelines.shards import write_shards

    jsonl = root / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / f"shards_{name}"
    write_shards(jsonl, media, out, samples_per_shard=per_shard, media_check="open", prefix=name, progress=False)
    return out


def run_config(out_dir: Path, model_yaml: Path, shards: list[str] | dict[str, list[str]], **overrides: Any) -> dict:
    """A small run config dict; ``overrides`` use dotted keys (``optim.lr``)."""
    sources = (
        [{"name": k, "shards": v} for k, v in shards.items()]
        if isinstance(shards, dict)
        else [{"name": "default", "shards": list(shards)}]
    )
    cfg: dict[str, Any] = {
        "stage": "test",
        "output_dir": str(out_dir),
        "model": {"config": str(model_yaml)},
        "data": {
            "sources": sources,
            "max_seq_len": 256,
            "shuffle_buffer": 4,
            "lookahead": 4,
            "image_min_pixels": 3136,
            "image_max_pixels": 6272,
            "num_workers": 0,  # in-process loading (the default sizes workers for a GPU's consumption)
        },
        "max_steps": 4,
        "grad_accum_steps": 1,
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "constant"},
        "distributed": {"deepspeed_config": str(REPO / "configs/deepspeed/zero2.json")},
        "checkpoint": {"every_steps": 2, "keep_last": 10, "export_hf": False},
        "logging": {"every_steps": 1, "progress": False},
        "wandb": {"mode": "none"},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    e = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONFAULTHANDLER="1",  # a crashed run, or one a test aborts for hanging (SIGABRT), prints its stacks
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    return e


def launch(config: Path, nproc: int = 1, extra: list[str] | None = None) -> subprocess.Popen:
    """Start a run: ``python -m train`` for one process, ``torchrun`` for several; new process group (killable)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "train", str(config)]
    else:
        cmd = [
            str(VENV_BIN / "torchrun"),
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "train",
            str(config),
        ]
    return subprocess.Popen(
        cmd + list(extra or []),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal a launcher and every process under it (torchrun starts its workers in their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a run; on timeout kill all its processes so a hang fails the test instead of hanging CI."""
    import signal

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"run timed out after {timeout}s; output tail:\n{out[-4000:]}") from None
    return proc.returncode, out


def run(config: Path, nproc: int = 1, timeout: float = 120, extra: list[str] | None = None) -> str:
    code, out = finish(launch(config, nproc, extra), timeout)
    assert code == 0, f"run failed with exit code {code}; output tail:\n{out[-4000:]}"
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(out_dir: Path) -> dict[int, float]:
    """Step → loss; a resumed run's later lines overwrite the killed run's lines of the same step."""
    return {row["step"]: row["loss"] for row in metrics(out_dir) if "loss" in row}


def hf_state(directory: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state
