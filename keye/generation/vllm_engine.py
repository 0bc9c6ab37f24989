"""``VLLMEngine``: vLLM (its ``KeyeVL1_5ForConditionalGeneration``) behind the engine interface of ``ChatEngine``.

The engine runs in this process (vLLM's in-process engine core, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a
trainer can push its weights into it by reference, without serialising them (:meth:`VLLMEngine.update_weights`:
vLLM's in-place ``reload_weights``, then every cache that holds results of the old weights is dropped). Inside a
torch.distributed job (a torchrun trainer) every rank builds its own engine on the job's process group (vLLM's
``external_launcher`` mode), each generating for its own prompts.

Requests are our encoded prompts (``keye.generation.vllm_inputs``); each answer's prompt ids, as vLLM expanded
them, must equal ours, or :class:`PromptMismatchError` says where they part. Outputs follow ``ChatEngine``'s
contract: token ids without the end-of-turn token, texts decoded by our tokenizer, plus vLLM's log-prob of every
sampled token (raw model log-probs, before temperature or top-p; the end-of-turn token's included) for the drift
monitor of RL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from data_pipelines.encoded import EncodedSample
from keye.generation import VLLMSettings, check_engine
from keye.generation.vllm_inputs import ClipRecordingProcessor, vllm_prompt
from keye.inference import GenerationResult, GenerationSettings, default_device
from keye.processing import KeyeVLProcessor


class PromptMismatchError(RuntimeError):
    """vLLM expanded a prompt's visual placeholders differently from our processor."""


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first position where ``a`` and ``b`` differ (the shorter length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


class VLLMEngine:
    """A vLLM engine for one checkpoint, with our processor in front of it."""

    name = "vllm"
    holds_weights = True  # a trainer must push its weights in (RLStep does before every rollout)

    def __init__(self, llm: Any, processor: KeyeVLProcessor, settings: VLLMSettings, owns_process_group: bool):
        self.llm = llm
        self.processor = ClipRecordingProcessor.wrap(processor)
        self.settings = settings
        self._owns_process_group = owns_process_group
        self._asleep = False
        tok = self.processor.tokenizer
        self.eos_ids = [int(tok.convert_tokens_to_ids("<|im_end|>")), int(tok.pad_token_id)]
        self.weight_sync_seconds = 0.0  # of the last update_weights

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        media: dict | None = None,
        device: str | None = None,
        dtype: str = "auto",
        settings: VLLMSettings | None = None,
        seed: int = 0,
        processor: KeyeVLProcessor | None = None,
    ) -> VLLMEngine:
        """vLLM on the checkpoint at ``model_dir`` (as ``vllm serve DIR --trust-remote-code`` loads it).

        ``dtype`` ``auto`` is bfloat16 on a GPU and float32 on a CPU, as for ``ChatEngine``; ``media`` overrides
        video options of our processor (``processor``, default the checkpoint's), which decides every prompt.
        ``device`` only chooses the dtype: vLLM runs on its platform's device (``local_rank``'s GPU in a job).
        """
        check_engine("vllm", "engine")
        from keye.auto import register
        from keye.inference import ChatEngine
        from keye.paths import checkpoint_dir

        model_dir = checkpoint_dir(model_dir)
        register()
        if processor is None:
            processor = ChatEngine.media_processor(KeyeVLProcessor.from_pretrained(model_dir), media)
        settings = settings or VLLMSettings()
        device = device or default_device()
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        llm, owns = build_llm(model_dir, dtype, settings, seed)
        return cls(llm, processor, settings, owns)

    # --- generation ------------------------------------------------------------------------------------------
    def encode(self, conversations: Sequence[Sequence[dict]], mode: str | None = None) -> list[EncodedSample]:
        return [self.processor.encode_conversation(c, mode=mode, add_generation_prompt=True) for c in conversations]

    def sampling_params(self, settings: GenerationSettings, index: int) -> Any:
        """vLLM's ``SamplingParams`` for ``settings``; a seeded batch gives request ``index`` seed ``seed + index``
        (one shared seed would make the G samples of a prompt identical)."""
        from vllm import SamplingParams

        sampled = settings.temperature > 0
        return SamplingParams(
            n=1,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if sampled else 0.0,
            top_p=settings.top_p if sampled else 1.0,
            top_k=settings.top_k if sampled else 0,
            repetition_penalty=settings.repetition_penalty,
            stop=list(settings.stop_strings) or None,
            include_stop_str_in_output=True,
            stop_token_ids=list(self.eos_ids),
            seed=None if settings.seed is None else settings.seed + index,
            logprobs=0,
        )

    @torch.inference_mode()
    def generate_encoded(
        self, samples: Sequence[EncodedSample], settings: GenerationSettings, streamer: Any = None
    ) -> GenerationResult:
        """Decode a batch of encoded prompts (``ChatEngine.generate_encoded``'s contract, plus log-probs)."""
        if streamer is not None:
            raise ValueError("the vLLM engine does not stream; use engine 'transformers' for streamed output")
        self.wake_up()
        start = time.perf_counter()
        image_config = self.processor.image_config
        prompts = [vllm_prompt(s, image_config) for s in samples]
        params = [self.sampling_params(settings, i) for i in range(len(samples))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        eos = set(self.eos_ids)
        token_ids, logprobs = [], []
        for k, (sample, out) in enumerate(zip(samples, outputs, strict=True)):
            ours, theirs = sample.input_ids.tolist(), list(out.prompt_token_ids)
            if theirs != ours:
                at = first_difference(ours, theirs)
                raise PromptMismatchError(
                    f"prompt {k} ({sample.sample_id or 'no id'}): vLLM's expanded prompt differs from ours at token "
                    f"{at} (ours {ours[at : at + 4]}, vLLM {theirs[at : at + 4]}; lengths {len(ours)} vs "
                    f"{len(theirs)}): the checkpoint's processor and keye.processing disagree on a visual input"
                )
            gen = out.outputs[0]
            ids = list(gen.token_ids)
            lps = [float(step[t].logprob) for step, t in zip(gen.logprobs or [], ids)]
            cut = next((i for i, t in enumerate(ids) if t in eos), None)
            token_ids.append(ids if cut is None else ids[:cut])
            logprobs.append(lps if cut is None else lps[: cut + 1])  # the end-of-turn token was sampled too
        tok = self.processor.tokenizer
        return GenerationResult(
            texts=[tok.decode(ids, skip_special_tokens=True) for ids in token_ids],
            token_ids=token_ids,
            visual_tokens=[s.num_visual_tokens for s in samples],
            prompt_tokens=[len(s) for s in samples],
            seconds=time.perf_counter() - start,
            logprobs=logprobs,
        )

    @torch.inference_mode()
    def sequence_logprobs(self, samples: Sequence[EncodedSample]) -> list[torch.Tensor]:
        """``[len - 1]`` fp32 per sample: the engine's log-prob of every token after the first given the tokens
        before it (what the trainer computes for the same ids): checks a weight push against the trainer."""
        from vllm import SamplingParams

        self.wake_up()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, stop_token_ids=list(self.eos_ids))
        prompts = [vllm_prompt(s, self.processor.image_config) for s in samples]
        out = []
        for sample, result in zip(samples, self.llm.generate(prompts, params, use_tqdm=False), strict=True):
            ids = sample.input_ids.tolist()
            if list(result.prompt_token_ids) != ids:
                raise PromptMismatchError(f"sample {sample.sample_id or '?'}: vLLM's expanded prompt differs from ours")
            lps = [float(result.prompt_logprobs[i][ids[i]].logprob) for i in range(1, len(ids))]
            out.append(torch.tensor(lps, dtype=torch.float32))
        return out

    def generate(
        self,
        conversations: Sequence[Sequence[dict]],
        settings: GenerationSettings | None = None,
        mode: str | None = None,
    ) -> list[str]:
        """Answers for a batch of chat-format conversations (the eval harness's interface)."""
        return self.generate_encoded(self.encode(conversations, mode), settings or GenerationSettings()).texts

    # --- weights and memory ----------------------------------------------------------------------------------
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Load ``(name, tensor)`` pairs named as in our checkpoints into the running engine, in place (vLLM's
        ``reload_weights``: fused projections are filled shard by shard, no restart, no disk), then drop the prefix,
        encoder and multimodal caches, which hold results of the old weights. The tensors are read while this
        runs, one at a time, so a generator may gather each from ZeRO-3 partitions just before it is needed.
        Returns the seconds it took."""
        start = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.weight_sync_seconds = time.perf_counter() - start
        return self.weight_sync_seconds

    def sleep(self) -> None:
        """Free the GPU memory of the KV cache (and the weights at level 2) between rollouts (``sleep_level``)."""
        if self.settings.sleep_level and not self._asleep:
            self.llm.sleep(level=self.settings.sleep_level)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down. The engine that created the process (and vLLM's) groups tears them down; one
        built on a trainer's group, or beside another engine, leaves them to their owner."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        if self._owns_process_group:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()


def build_llm(model_dir: str | Path, dtype: str, settings: VLLMSettings, seed: int) -> tuple[Any, bool]:
    """``(vllm.LLM, whether it created the process group)``, in this process, leaving process-wide torch settings
    (thread count, ``torch.set_num_threads``) as they were: vLLM's CPU worker pins them for serving, which would
    silently slow a trainer sharing the process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights are pushed by reference
    import torch.distributed as dist
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    had_group = dist.is_available() and dist.is_initialized()
    if had_group and "RANK" in os.environ:  # a torchrun job (the trainer's group): one engine per rank
        kwargs["distributed_executor_backend"] = "external_launcher"
        os.environ.setdefault("LOCAL_RANK", "0")
    cuda = torch.cuda.is_available()
    if cuda:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if settings.sleep_level:
            kwargs["enable_sleep_mode"] = True
    else:
        if settings.sleep_level:
            raise ValueError("vllm.sleep_level needs a GPU (vLLM has no sleep mode on CPUs); set it to 0")
        kwargs["kv_cache_memory_bytes"] = int(settings.cpu_kv_cache_gb * (1 << 30))
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        llm = LLM(
            model=str(model_dir),
            trust_remote_code=True,
            dtype=dtype,
            seed=seed,
            max_model_len=settings.max_model_len or None,
            tensor_parallel_size=settings.tensor_parallel_size,
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=settings.enable_prefix_caching,
            limit_mm_per_prompt=dict(settings.limit_mm_per_prompt),
            # vLLM 0.32's processor cache loses a cached video's Slow-Fast kwargs (its Keye-VL 1.5 prompt update
            # then fails on a repeated video); the encoder and prefix caches still share work between requests
            mm_processor_cache_gb=0,
            **kwargs,
        )
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
    return llm, not had_group
