"""``ToolChatEngine``: the Thyme loop behind the plain ``generate(conversations, settings) -> list[str]`` seam, so
the eval harness (``tools=true``) scores tool-using answers like any other engine's."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence

from keye.inference import GenerationSettings
from keye.thyme.config import ToolLoopConfig
from keye.thyme.loop import SegmentEngine, ToolLoop, materialize_images
from keye.thyme.prompt import add_thyme_prompt
from keye.thyme.trajectory import ToolTrajectory


class ToolChatEngine:
    """Wraps a :class:`~keye.inference.ChatEngine`; each ``generate`` call runs its batch through the tool loop."""

    def __init__(self, engine: SegmentEngine, config: ToolLoopConfig | None = None, thyme_prompt: bool = True):
        self.engine = engine
        self.processor = engine.processor
        self.loop = ToolLoop(engine, config or ToolLoopConfig.evaluation())
        self.thyme_prompt = thyme_prompt
        self.last_trajectories: list[ToolTrajectory] = []

    def generate(
        self, conversations: Sequence[Sequence[dict]], settings: GenerationSettings | None = None, mode=None
    ) -> list[str]:
        """Final assistant texts (sandbox outputs included, images as ``<image>``); ``settings`` set the text
        segments' decoding and the token budget, code stays at the loop config's ``code_temperature``."""
        cfg = self.loop.config
        if settings is not None:
            cfg = dataclasses.replace(
                cfg,
                max_new_tokens=settings.max_new_tokens,
                text_temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                repetition_penalty=settings.repetition_penalty,
            )
        with tempfile.TemporaryDirectory(prefix="keye_thyme_") as work:
            convs = []
            for conv in conversations:
                conv, paths = materialize_images(conv, None, work)
                convs.append(add_thyme_prompt(conv, paths) if self.thyme_prompt else conv)
            self.last_trajectories = self.loop.run(convs, mode=mode, out_dir=work, config=cfg)
        return [t.text for t in self.last_trajectories]

    def close(self) -> None:
        self.loop.close()
