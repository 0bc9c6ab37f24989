"""One Thyme trajectory as token ids: the exact sequence the model saw, grown segment by segment.

The state is kept at the id level rather than re-encoded from text after every round: generated tokens are
appended exactly as sampled (policy tokens), sandbox output is tokenised with the same processor calls
``encode_conversation`` uses (``<sandbox_output>``, text, ``image_ids(grid)`` per image), and each spliced image's
patches join the sample's ``pixel_values``. So the final :class:`~data_pipelines.encoded.EncodedSample` is token for token
the context of every generation step, and the RL trainer can recompute log-probs on it with ``policy_mask``
(1 = sampled by the policy, 0 = prompt or sandbox output) aligned to ``input_ids``. When the engine reports the
log-prob of each token it sampled (vLLM), ``engine_logprobs`` holds them on the same positions (NaN elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from data_pipelines.encoded import IGNORE_INDEX, EncodedSample, VisualInputs
from keye.processing import MERGE, KeyeVLProcessor
from keye.reasoning import extract_final_answer
from keye.rope import multimodal_position_ids

OPEN, CLOSE = "<sandbox_output>", "</sandbox_output>"


@dataclass
class SegmentRecord:
    """One generation call for one trajectory: which kind of text, decoded how, and why it stopped."""

    kind: str  # "text" or "code" (the ATS code segment after <code>)
    round: int  # index of the code round it belongs to
    temperature: float
    tokens: int
    stop: str  # the stop string reached, "eos", "length" or "invalid_token"
    text: str
    retry: int = 0  # 0 = first attempt at this round, k = k-th retry
    discarded: bool = False  # rolled back with a failed round


@dataclass
class RoundRecord:
    """One executed code block and what was spliced back."""

    index: int
    code: str | None
    status: str  # sandbox status (ok/error/timeout/killed), or "no_code" / "no_output"
    stdout: str = ""
    error: str = ""
    images: list[str] = field(default_factory=list)  # spliced image files, in order
    dropped_images: int = 0  # outputs over the trajectory's image limit
    feedback: str = ""  # the text spliced inside <sandbox_output> (besides the images)
    repairs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    attempt: int = 0  # which try of this round (0 = first)

    @property
    def failed(self) -> bool:
        return self.status != "ok"


@dataclass
class ToolTrajectory:
    """What a finished trajectory hands to its caller (chat, eval, the RL trainer)."""

    content: list[dict]  # the assistant turn as items (text / image), sandbox outputs included
    text: str  # the assistant turn as text; each spliced image is "<image>" (Thyme's format, for rewards)
    answer: str
    rounds: list[RoundRecord]
    discarded_rounds: list[RoundRecord]
    segments: list[SegmentRecord]
    sample: EncodedSample  # the whole conversation; labels = input_ids on policy tokens, else IGNORE_INDEX
    policy_mask: torch.Tensor  # [L] long, 1 on tokens the policy generated
    prompt_length: int
    finish_reason: str  # answer, eos, length, max_length, max_rounds, invalid_token
    messages: list[dict]  # the input conversation plus the assistant turn
    engine_logprobs: torch.Tensor | None = None  # [L] fp32 on policy tokens (NaN elsewhere), engines that report them

    @property
    def policy_tokens(self) -> int:
        return int(self.policy_mask.sum())

    @property
    def sandbox_tokens(self) -> int:
        return len(self.sample) - self.prompt_length - self.policy_tokens


@dataclass
class RoundMark:
    """Lengths at the start of a round, to roll a failed round back."""

    ids: int
    images: int
    content: int
    texts: int
    tokens_used: int


class TrajectoryState:
    """Token-level state of one trajectory; knows nothing of sandboxes or engines."""

    def __init__(self, processor: KeyeVLProcessor, prompt: EncodedSample, messages: list[dict]) -> None:
        self.processor = processor
        self.messages = messages
        self.ids: list[int] = prompt.input_ids.tolist()
        self.policy: list[int] = [0] * len(self.ids)
        self.meta = prompt.meta  # the vLLM engine's decoded clips travel here (keye.generation.vllm_inputs)
        self.engine_lp: list[float] = [math.nan] * len(self.ids)
        self.has_engine_lp = False
        self.prompt_length = len(self.ids)
        self.token_ids = prompt.token_ids
        visual = prompt.visual
        self.img_patches: list[torch.Tensor] = [] if visual.pixel_values is None else [visual.pixel_values]
        self.img_grids: list[list[int]] = [] if visual.image_grid_thw is None else visual.image_grid_thw.tolist()
        self.n_input_images = len(self.img_grids)
        self.vid_patches = visual.pixel_values_videos
        self.vid_grid = visual.video_grid_thw
        self.content: list[dict] = []
        self.texts: list[str] = []
        self.tokens_used = 0
        if messages and messages[-1].get("role") == "assistant":  # a prefilled assistant turn being continued
            self.messages = messages[:-1]
            prefill = messages[-1]["content"]
            items = [{"type": "text", "text": prefill}] if isinstance(prefill, str) else [dict(i) for i in prefill]
            self.content = items
            self.texts = [i.get("text", "") if i.get("type") == "text" else "<image>" for i in items]

    # --- building --------------------------------------------------------------------------------------------
    def add_generated(self, ids: list[int], text: str, logprobs: list[float] | None = None) -> None:
        """Policy tokens, exactly as sampled (with the engine's log-probs of them, when it reports them)."""
        self.ids.extend(ids)
        self.policy.extend([1] * len(ids))
        self._add_engine_lp(logprobs, len(ids))
        self.tokens_used += len(ids)
        if text:
            self.content.append({"type": "text", "text": text})
            self.texts.append(text)

    def add_eos(self, eos_id: int, logprob: float | None = None) -> None:
        """The end-of-turn token the engine strips from its output; the policy sampled it, so it is trained."""
        self.ids.append(eos_id)
        self.policy.append(1)
        self._add_engine_lp(None if logprob is None else [logprob], 1)

    def _add_engine_lp(self, logprobs: list[float] | None, n: int) -> None:
        if logprobs is not None:
            self.has_engine_lp = True
        given = list(logprobs or [])[:n]
        self.engine_lp.extend(given + [math.nan] * (n - len(given)))

    def add_sandbox_output(self, text: str, images: list[str]) -> None:
        """``<sandbox_output>`` + one image block per image (or the text) + ``</sandbox_output>``, all mask 0."""
        tok = self.processor.tokenizer
        self._add_fixed(tok.encode(OPEN, add_special_tokens=False))
        for path in images:
            patches, grid = self.processor.encode_image({"image": path})
            self.img_patches.append(patches)
            self.img_grids.append(grid)
            self._add_fixed(self.processor.image_ids(grid))
        if text:
            self._add_fixed(tok.encode(text, add_special_tokens=False))
        self._add_fixed(tok.encode(CLOSE, add_special_tokens=False))
        if images:
            self.content.append({"type": "text", "text": OPEN})
            self.content.extend({"type": "image", "image": p} for p in images)
            self.content.append({"type": "text", "text": text + CLOSE})
        else:
            self.content.append({"type": "text", "text": OPEN + text + CLOSE})
        self.texts.append(OPEN + "<image>" * len(images) + text + CLOSE)

    def _add_fixed(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        self.policy.extend([0] * len(ids))
        self.engine_lp.extend([math.nan] * len(ids))

    # --- rollback --------------------------------------------------------------------------------------------
    def mark(self) -> RoundMark:
        return RoundMark(len(self.ids), len(self.img_grids), len(self.content), len(self.texts), self.tokens_used)

    def rollback(self, mark: RoundMark) -> None:
        del self.ids[mark.ids :], self.policy[mark.ids :], self.engine_lp[mark.ids :]
        del self.img_grids[mark.images :]
        del self.content[mark.content :], self.texts[mark.texts :]
        self.tokens_used = mark.tokens_used
        # Patch tensors are per image after the prompt's one tensor of input images.
        keep = (1 if self.n_input_images else 0) + (mark.images - self.n_input_images)
        del self.img_patches[keep:]

    # --- views -----------------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return len(self.img_grids)

    def text_since(self, mark: RoundMark) -> str:
        return "".join(self.texts[mark.texts :])

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def sample(self) -> EncodedSample:
        input_ids = torch.tensor(self.ids, dtype=torch.long)
        image_grid = torch.tensor(self.img_grids, dtype=torch.long).view(-1, 3) if self.img_grids else None
        ids = self.token_ids
        positions = multimodal_position_ids(input_ids, ids.image, ids.video, image_grid, self.vid_grid, MERGE)
        mask = torch.tensor(self.policy, dtype=torch.long)
        return EncodedSample(
            input_ids=input_ids,
            labels=torch.where(mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
            position_ids=positions,
            token_ids=ids,
            visual=VisualInputs(
                torch.cat(self.img_patches) if self.img_patches else None, image_grid, self.vid_patches, self.vid_grid
            ),
            meta=dict(self.meta),
        )

    def result(
        self,
        rounds: list[RoundRecord],
        discarded: list[RoundRecord],
        segments: list[SegmentRecord],
        finish_reason: str,
    ) -> ToolTrajectory:
        text = self.text
        return ToolTrajectory(
            content=list(self.content),
            text=text,
            answer=extract_final_answer(text),
            rounds=rounds,
            discarded_rounds=discarded,
            segments=segments,
            sample=self.sample(),
            policy_mask=torch.tensor(self.policy, dtype=torch.long),
            prompt_length=self.prompt_length,
            finish_reason=finish_reason,
            messages=[*self.messages, {"role": "assistant", "content": list(self.content)}],
            engine_logprobs=torch.tensor(self.engine_lp, dtype=torch.float32) if self.has_engine_lp else None,
        )
