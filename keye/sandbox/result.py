"""``SandboxResult``: what one code block produced, in the shape the tool loop and ``keye sandbox --json`` use."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

STATUSES = ("ok", "error", "timeout", "killed")


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (surrogate code points, e.g. printed by model code) as U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


@dataclass
class SandboxResult:
    """``status`` is one of ok/error/timeout/killed; ``error`` is the one line the model is shown on failure."""

    status: str
    stdout: str = ""
    error: str = ""
    images: list[str] = field(default_factory=list)  # host paths of output images, copied to the caller's out_dir
    repairs: list[str] = field(default_factory=list)  # names of the repair passes that changed the code
    duration_s: float = 0.0
    truncated: bool = False  # stdout hit the sandbox's output limit (the rest was dropped)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"SandboxResult.status must be one of {STATUSES}, got {self.status!r}")
        # Whatever the code printed, callers (tokenizers, JSON on stdout) get valid UTF-8.
        self.stdout, self.error = valid_utf8(self.stdout), valid_utf8(self.error)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        """The stable CLI contract: ``status``, ``stdout``, ``error``, ``images``, then ``truncated``."""
        return {
            "status": self.status,
            "stdout": self.stdout,
            "error": self.error,
            "images": list(self.images),
            "truncated": self.truncated,
        }

    def feedback(self) -> str:
        """Text for ``<sandbox_output>``: the error if the block failed, else stdout."""
        return self.error if self.status != "ok" else self.stdout
