"""The Thyme tool loop: generate until ``</code>``, run the code in the trajectory's sandbox, splice the output into
the same assistant turn, continue (KEYE_FACTS B §1.3), with GRPO-ATS sampling (§1.6).

Segments: with ``ats`` a text segment stops at ``<code>``, ``</code>`` or ``</answer>`` and is sampled at
``text_temperature``; after ``<code>`` a code segment is decoded at ``code_temperature`` until ``</code>``. Many
trajectories advance together: each step batches the active ones that share decoding settings into one
``generate_encoded`` call, then runs all pending code blocks in parallel (one sandbox session per trajectory);
finished trajectories drop out. A failed round can be rolled back and regenerated hotter (``retries``).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from data_pipelines.encoded import EncodedSample
from keye.inference import GenerationResult, GenerationSettings
from keye.processing import KeyeVLProcessor
from keye.sandbox import Sandbox, SandboxSession, extract_code
from keye.thyme.config import ToolLoopConfig
from keye.thyme.trajectory import RoundMark, RoundRecord, SegmentRecord, ToolTrajectory, TrajectoryState

ERROR_PREFIX = "Error: "  # recognised by train.rl.rewards.SANDBOX_ERROR_PREFIXES (code_success_reward)
TEXT_STOPS_ATS = ("<code>", "</code>", "</answer>")
TEXT_STOPS = ("</code>", "</answer>")
CODE_STOPS = ("</code>",)


class SegmentEngine(Protocol):
    """What the loop needs from an engine (both ``keye.generation`` engines: ``generate_encoded`` stops after a stop
    string's last token and returns the tokens up to it)."""

    processor: KeyeVLProcessor

    def generate_encoded(self, samples: Sequence[EncodedSample], settings: GenerationSettings) -> GenerationResult: ...


@dataclass
class ToolEvent:
    """Progress report for ``on_event``: kind is segment, round, rollback or finish."""

    index: int
    kind: str
    segment: SegmentRecord | None = None
    round: RoundRecord | None = None
    finish_reason: str = ""


@dataclass
class _Run:
    index: int
    state: TrajectoryState
    input_paths: list[str]
    out_dir: str
    mark: RoundMark
    kind: str = "text"
    retry: int = 0
    pending_exec: bool = False
    finish: str | None = None
    session: SandboxSession | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    discarded: list[RoundRecord] = field(default_factory=list)
    segments: list[SegmentRecord] = field(default_factory=list)


def materialize_images(
    messages: Sequence[dict], media_root: str | Path | None, work_dir: str | Path
) -> tuple[list[dict], list[str]]:
    """Messages whose image items all name files (PIL/bytes written to ``work_dir``), and those files in order.

    The sandboxed code opens the image itself, so every input image must exist as a file it can be given.
    """
    out, paths = [], []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, str) or msg.get("role") == "assistant":
            out.append(msg)
            continue
        items = []
        for j, item in enumerate(content or []):
            if item.get("type") == "image":
                src = item.get("image")
                if isinstance(src, (str, Path)):
                    path = Path(src) if Path(src).is_absolute() or media_root is None else Path(media_root) / src
                elif isinstance(src, (bytes, Image.Image)):
                    path = Path(work_dir) / f"input_{i}_{j}.png"
                    image = Image.open(io.BytesIO(src)) if isinstance(src, bytes) else src
                    image.convert("RGB").save(path)
                else:
                    raise ValueError(f"message {i} item {j}: image must be a path, bytes or PIL image for tool use")
                item = {**item, "image": str(path)}
                paths.append(str(path))
            items.append(item)
        out.append({**msg, "content": items})
    return out, paths


def _stop_reached(text: str, stops: Sequence[str]) -> str | None:
    """The stop string that ended ``text`` (the one whose first occurrence ends earliest), if any."""
    best, best_end = None, None
    for s in stops:
        pos = text.find(s)
        if pos >= 0 and (best_end is None or pos + len(s) < best_end):
            best, best_end = s, pos + len(s)
    return best


class ToolLoop:
    """Runs batches of conversations through the Thyme loop; owns a sandbox (created on the first code block)."""

    def __init__(self, engine: SegmentEngine, config: ToolLoopConfig | None = None, sandbox: Sandbox | None = None):
        self.engine = engine
        self.config = config or ToolLoopConfig()
        self._sandbox = sandbox
        self._own_sandbox = sandbox is None
        self._threads: ThreadPoolExecutor | None = None

    @property
    def processor(self) -> KeyeVLProcessor:
        return self.engine.processor

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None
        if self._own_sandbox and self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def __enter__(self) -> ToolLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the loop --------------------------------------------------------------------------------------------
    def run(
        self,
        conversations: Sequence[Sequence[dict]],
        mode: str | None = None,
        media_root: str | Path | None = None,
        out_dir: str | Path | None = None,
        on_event: Callable[[ToolEvent], None] | None = None,
        config: ToolLoopConfig | None = None,
    ) -> list[ToolTrajectory]:
        """One trajectory per conversation (a final assistant turn is continued, not answered anew).

        Sandbox output images are written under ``out_dir`` (a new temp dir, left for the caller, when None);
        the returned ``content`` items name them.
        """
        cfg = config or self.config
        emit = on_event or (lambda event: None)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        work = str(out_dir) if out_dir is not None else tempfile.mkdtemp(prefix="keye_thyme_")
        Path(work).mkdir(parents=True, exist_ok=True)
        runs = [self._start(i, conv, mode, media_root, work) for i, conv in enumerate(conversations)]
        try:
            while True:
                budgets = {r.index: self._budget(r, cfg, emit) for r in runs if r.finish is None}
                active = [r for r in runs if r.finish is None]
                if not active:
                    break
                groups: dict[tuple, list[_Run]] = {}
                for r in active:
                    groups.setdefault(self._segment_key(r, cfg), []).append(r)
                for (_kind, temperature, stops), group in groups.items():
                    settings = GenerationSettings(
                        max_new_tokens=max(budgets[r.index][0] for r in group),
                        temperature=temperature,
                        top_p=cfg.top_p,
                        top_k=cfg.top_k,
                        repetition_penalty=cfg.repetition_penalty,
                        stop_strings=list(stops),
                    )
                    result = self.engine.generate_encoded([r.state.sample() for r in group], settings)
                    logprobs = result.logprobs or [None] * len(group)
                    for r, ids, lps in zip(group, result.token_ids, logprobs, strict=True):
                        self._take_segment(r, list(ids), settings, budgets[r.index], cfg, emit, lps)
                pending = [r for r in runs if r.pending_exec]
                if pending:
                    self._execute(pending, cfg, emit)
        finally:
            for r in runs:
                if r.session is not None:
                    r.session.close()
        return [r.state.result(r.rounds, r.discarded, r.segments, r.finish or "length") for r in runs]

    def _start(self, index: int, conv: Sequence[dict], mode: str | None, media_root, work: str) -> _Run:
        out_dir = str(Path(work) / f"traj{index:04d}")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        messages, paths = materialize_images(conv, media_root, out_dir)
        prefill = bool(messages) and messages[-1].get("role") == "assistant"
        prompt = self.processor.encode_conversation(
            messages,
            mode=mode,
            add_generation_prompt=not prefill,
            media_root=media_root,
            continue_final_message=prefill,
        )
        state = TrajectoryState(self.processor, prompt, messages)
        return _Run(index=index, state=state, input_paths=paths, out_dir=out_dir, mark=state.mark())

    def _segment_key(self, r: _Run, cfg: ToolLoopConfig) -> tuple:
        temperature = cfg.code_temperature if r.kind == "code" else cfg.text_temperature
        if r.retry:
            temperature = max(temperature, cfg.retry_temperature)
        stops = CODE_STOPS if r.kind == "code" else (TEXT_STOPS_ATS if cfg.ats else TEXT_STOPS)
        return r.kind, temperature, stops

    def _budget(self, r: _Run, cfg: ToolLoopConfig, emit) -> tuple[int, str]:
        """(tokens this segment may use, the finish reason if it uses them all); finishes a spent trajectory."""
        tokens_left = cfg.max_new_tokens - r.state.tokens_used
        context_left = cfg.max_length - len(r.state.ids)
        budget, reason = (tokens_left, "length") if tokens_left <= context_left else (context_left, "max_length")
        if budget <= 0:
            self._finish(r, reason, emit)
        return budget, reason

    def _take_segment(self, r, ids, settings, budget: tuple[int, str], cfg, emit, logprobs=None) -> None:
        """Append one generated segment (``logprobs``: the engine's, one per id plus the end-of-turn token's)."""
        limit, limit_reason = budget
        ids = ids[:limit]
        placeholders = (r.state.token_ids.image, r.state.token_ids.video)  # generated ones have no pixels behind them
        bad = next((k for k, t in enumerate(ids) if t in placeholders), None)
        if bad is not None:
            ids = ids[:bad]
        text = self.processor.decode(ids, skip_special_tokens=False)
        stop = "invalid_token" if bad is not None else _stop_reached(text, settings.stop_strings)
        if stop is None:
            stop = limit_reason if len(ids) >= limit else "eos"
        r.state.add_generated(ids, text, None if logprobs is None else list(logprobs[: len(ids)]))
        if stop == "eos":
            eos_lp = logprobs[len(ids)] if logprobs is not None and len(logprobs) > len(ids) else None
            r.state.add_eos(self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), eos_lp)
        seg = SegmentRecord(r.kind, len(r.rounds), settings.temperature, len(ids), stop, text, retry=r.retry)
        r.segments.append(seg)
        emit(ToolEvent(r.index, "segment", segment=seg))
        if stop in ("eos", "length", "max_length", "invalid_token"):
            self._finish(r, stop, emit)
        elif stop == "</answer>":
            self._finish(r, "answer", emit)
        elif len(r.rounds) >= cfg.max_rounds:
            self._finish(r, "max_rounds", emit)
        elif stop == "<code>":
            r.kind = "code"
        else:  # </code>
            r.pending_exec = True

    def _finish(self, r: _Run, reason: str, emit) -> None:
        r.finish = reason
        if r.session is not None:
            r.session.close()
            r.session = None
        emit(ToolEvent(r.index, "finish", finish_reason=reason))

    # --- code rounds -----------------------------------------------------------------------------------------
    def _sandbox_for(self, cfg: ToolLoopConfig) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(cfg.sandbox)
        return self._sandbox

    def _execute(self, runs: list[_Run], cfg: ToolLoopConfig, emit) -> None:
        sandbox = self._sandbox_for(cfg)
        for r in runs:
            if r.session is None:
                r.session = sandbox.session()

        def one(r: _Run) -> RoundRecord:
            index = len(r.rounds)
            code = extract_code(r.state.text_since(r.mark))
            if code is None:
                return RoundRecord(index, None, "no_code", error="no code between <code> and </code>")
            res = r.session.run(code, r.input_paths, r.out_dir)
            rec = RoundRecord(index, code, res.status, res.stdout, res.error, list(res.images), 0, res.repairs)
            rec.seconds = res.duration_s
            if res.ok and not res.images and not res.stdout.strip():
                rec.status, rec.error = "no_output", "the code printed nothing and saved no image"
            return rec

        if len(runs) == 1:
            records = [one(runs[0])]
        else:
            # One long-lived pool: a jail started from a thread dies with that thread (bwrap --die-with-parent is
            # per thread), so the threads that may start sandbox workers must outlive the sessions.
            if self._threads is None:
                self._threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="keye-thyme")
            records = list(self._threads.map(one, runs))
        for r, rec in zip(runs, records):
            r.pending_exec = False
            self._finish_round(r, rec, cfg, emit)

    def _finish_round(self, r: _Run, rec: RoundRecord, cfg: ToolLoopConfig, emit) -> None:
        rec.attempt = r.retry
        if rec.failed and r.retry < cfg.retries:
            # Thyme's evaluation: discard the failed segment(s) and regenerate the round hotter. The sandbox's
            # notebook state is not rewound: variables the failed block set before it raised remain.
            r.state.rollback(r.mark)
            for seg in r.segments:
                if seg.round == rec.index and seg.retry == r.retry:
                    seg.discarded = True
            r.discarded.append(rec)
            r.retry += 1
            r.kind = "text"
            emit(ToolEvent(r.index, "rollback", round=rec))
            return
        room = max(0, cfg.max_images - r.state.n_images)
        rec.dropped_images = max(0, len(rec.images) - room)
        rec.images = rec.images[:room]
        if rec.failed:
            text = ERROR_PREFIX + rec.error
        else:
            text = "" if rec.images else rec.stdout
        if rec.dropped_images:
            note = f"[{rec.dropped_images} image(s) not shown: at most {cfg.max_images} images per conversation]"
            text = f"{text}\n{note}" if text else note
        rec.feedback = text
        r.state.add_sandbox_output(text, rec.images)
        r.rounds.append(rec)
        r.retry = 0
        r.kind = "text"
        r.mark = r.state.mark()
        emit(ToolEvent(r.index, "round", round=rec))
