"""What every training run shares (torchtitan's ``Trainer`` + ``CheckpointManager`` in miniature): process group,
precision, DeepSpeed engine and optimizer, resume, metric logger, stop flag, checkpoints and the finish (last
checkpoint, HF export, summary). A loop (``train.loop``: pretraining/SFT, ``train.rl.run``: GSPO) builds its model,
calls ``build`` and ``resume``, sets ``state`` (what a checkpoint keeps besides step and RNG) and hands ``loop`` its
step function: ``step_fn(step)`` returns a stop reason, or a function giving the step's log values (on log steps).
"""

from __future__ import annotations

import _thread
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keye.typed_config import save_config
from train.checkpoint import complete_checkpoints, export_hf, load_checkpoint, rng_state, save_checkpoint
from train.config import RunConfig
from train.engine import deepspeed_config, init_distributed, register_zero3_external_parameters, resolve_precision
from train.metrics import MetricLogger
from train.optim import build_optimizer, scheduler_factory

StepResult = str | Callable[[], dict[str, Any]]  # a stop reason, or the step's log values (called on log steps)


class StopRequested(BaseException):
    """Raised out of a wait for data when a stop signal arrives (``StopFlag.waiting``); a ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` in the data pipeline can swallow it."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the ranks agree on it at the next step so they all checkpoint together.

    While the loop waits for data (``with flag.waiting():``) a signal also interrupts the wait, so a run whose data
    is slow or never comes still stops promptly; ``signum`` gives the run's exit status (128 + signum).

    An exception raised by a signal handler can be lost: when the handler runs inside a finalizer (an unclosed
    file's ``close()`` during its deallocation: ``io`` clears any error there without a word), the wait goes on.
    So a signal that interrupts a wait also starts a watchdog that interrupts it again every ``retry_s`` seconds
    until the wait has ended (measured: a tight loop reading tar members without closing them lost about one
    raise in twenty, and a run then hung past its SIGTERM).
    """

    def __init__(self, retry_s: float = 1.0) -> None:
        self.raised = False
        self.signum: int | None = None
        self.in_wait = False
        self.previous: dict[int, Any] = {}
        self.retry_s = retry_s
        self.waits_ended = 0  # waits left so far: the watchdog's wait has ended once this moves
        self.lock = threading.Lock()  # the watchdog never interrupts after restore()
        self.restored = False
        self.watchdog: threading.Thread | None = None

    def install(self) -> None:
        self.restored = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised, self.signum = True, signum
        if not self.in_wait:
            return
        if self.watchdog is None or not self.watchdog.is_alive():
            self.watchdog = threading.Thread(
                target=self._interrupt_until_ended, args=(signum, self.waits_ended), name="keye-stop", daemon=True
            )
            self.watchdog.start()
        if frame is not None and frame.f_code in _WAIT_EDGES:
            return  # entering or leaving the wait: a raise here could skip its bookkeeping; the watchdog follows up
        self.in_wait = False
        raise StopRequested

    def _interrupt_until_ended(self, signum: int, wait: int) -> None:
        """Re-deliver ``signum`` to the main thread while the wait it interrupted is still going on."""
        while True:
            time.sleep(self.retry_s)
            with self.lock:
                if self.restored or self.waits_ended != wait:
                    return
                self.in_wait = True  # the last raise was lost: the handler raises again
                _thread.interrupt_main(signum)

    def waiting(self) -> StopFlag:
        """``with flag.waiting():`` a block that a stop signal may interrupt (with ``StopRequested``)."""
        return self

    def __enter__(self) -> None:
        if self.raised:
            raise StopRequested
        self.in_wait = True

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.in_wait = False
            self.waits_ended += 1

    def restore(self) -> None:
        with self.lock:
            self.restored = True
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


_WAIT_EDGES = (StopFlag.__enter__.__code__, StopFlag.__exit__.__code__)


class RunContext:
    """One run's engine, optimizer, logger, stop flag and checkpoints; ``loop`` drives a step function to the end."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        info = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_minutes, cfg.distributed.deterministic)
        self.rank, self.world, self.device = info.rank, info.world, info.device
        self.precision = resolve_precision(cfg, self.device)
        self.ds_config = deepspeed_config(cfg, self.world, self.precision)
        self.out_dir, self.stop = Path(cfg.output_dir), StopFlag()
        self.state: Callable[[], dict[str, Any]] = dict  # a checkpoint's state beside step and RNG
        self.extra: Callable[[], dict[str, Any]] = dict  # fields of the finished event and the summary
        self.closing: list[Callable[[], Any]] = []  # called last, after the logger closes
        torch.manual_seed(cfg.seed)

    def build(self, model: torch.nn.Module, groups: list[dict], processor: Any, updates_per_step: int = 1) -> Any:
        """The DeepSpeed engine over ``model``, its optimizer over ``groups``; the LR schedule counts optimizer
        steps (``updates_per_step`` per run step, its warmup scaled alike)."""
        import deepspeed

        plan = self.cfg.schedule
        schedule = dataclasses.replace(plan, warmup_steps=plan.warmup_steps * updates_per_step)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(groups, self.cfg.optim),
            lr_scheduler=scheduler_factory(schedule, self.cfg.max_steps * updates_per_step),
            config=self.ds_config,
            dist_init_required=False,
        )
        if self.engine.zero_optimization_partition_weights():
            register_zero3_external_parameters(self.engine.module)
        self.processor = processor
        return self.engine

    def resume(self) -> dict[str, Any]:
        """Write config.yaml, continue from the newest complete checkpoint (if any and ``checkpoint.resume``), seed
        this rank's torch stream by (seed, rank, step) so that a resumed run draws what the original did, and open
        the logger. Returns this rank's saved state for the loop to restore (``{}`` when fresh)."""
        cfg, saved, self.step, self.resumed_from = self.cfg, {}, 0, None
        if self.rank == 0:
            save_config(cfg, self.out_dir / "config.yaml")
        if cfg.checkpoint.resume and (found := complete_checkpoints(self.out_dir / "checkpoints")):
            self.resumed_from, ckpt = found[-1]
            saved = load_checkpoint(self.engine, ckpt, self.rank, self.world)
            self.step = saved["step"]
        torch.manual_seed(cfg.seed + 1000 * (self.rank + 1) + self.step)
        self.last_saved = self.step if self.resumed_from is not None else None
        self.logger = MetricLogger(cfg, self.rank, self.step, self.resumed_from is not None)
        return saved

    def checkpoint(self, state: dict[str, Any] | None = None) -> None:
        """Save the current step (collective), unless it is saved already; ``state`` replaces ``self.state()``."""
        if self.last_saved == self.step:
            return
        rank_state = {"step": self.step, "rng": rng_state(), **(self.state() if state is None else state)}
        path = save_checkpoint(self.engine, self.cfg, self.step, rank_state, self.processor, self.rank)
        self.logger.event("checkpoint", step=self.step, path=str(path))
        self.last_saved = self.step

    def loop(self, step_fn: Callable[[int], StepResult]) -> dict[str, Any]:
        """Run ``step_fn`` until ``max_steps`` or a stop reason, logging and checkpointing at their intervals; then
        the last checkpoint, the HF export (not after a stop signal) and the summary every rank returns."""
        cfg, stopped_by = self.cfg, "max_steps"
        self.stop.install()
        try:
            while self.step < cfg.max_steps:
                result = step_fn(self.step)
                if isinstance(result, str):
                    stopped_by = result
                    break
                self.step += 1
                self.logger.advance()
                if self.step % cfg.logging.every_steps == 0 or self.step == cfg.max_steps:
                    self.logger.log(self.step, result())
                if self.step % cfg.checkpoint.every_steps == 0:
                    self.checkpoint()
            self.checkpoint()
            if stopped_by != "signal":  # a stop signal leaves little time: the checkpoint above is what matters
                export_hf(self.engine, self.processor, self.out_dir / "hf", self.rank)
                dist.barrier()
            self.logger.event("finished", console=False, step=self.step, stopped_by=stopped_by, **self.extra())
        finally:
            self.stop.restore()
            self.logger.close()
            for close in self.closing:
                close()
        return {
            "step": self.step,
            "stopped_by": stopped_by,
            "signal": self.stop.signum if stopped_by == "signal" else None,
            "output_dir": str(self.out_dir),
            "export": str(self.out_dir / "hf"),
            **self.extra(),
            "rank": self.rank,
            "world": self.world,
        }
