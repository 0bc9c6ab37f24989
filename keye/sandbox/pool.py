"""Warm workers and the ``Sandbox`` front door.

Starting a jail and importing numpy/PIL/cv2 costs a few hundred milliseconds, more than most code blocks run.
``WorkerPool`` keeps ``pool_size`` workers started and idle in the background; a trajectory takes one, uses it
for all its blocks, and it is killed afterwards (never reused, so no state leaks between trajectories).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from keye.sandbox.config import SandboxConfig
from keye.sandbox.executor import SandboxSession, WorkerProcess, start_worker
from keye.sandbox.jail import Jail
from keye.sandbox.result import SandboxResult

log = logging.getLogger(__name__)


class WorkerPool:
    """Keeps up to ``size`` ready workers; ``take()`` hands one over (or ``None`` if none is ready yet)."""

    def __init__(self, jail: Jail, size: int) -> None:
        self.jail, self.size = jail, size
        self._idle: list[WorkerProcess] = []
        self._cond = threading.Condition()
        self._closed = False
        self._failures = 0
        self._thread = threading.Thread(target=self._fill, name="keye-sandbox-pool", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._idle) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                worker = start_worker(self.jail)
            except Exception as exc:  # noqa: BLE001 - keep serving cold starts; stop refilling after repeats
                self._failures += 1
                log.warning("sandbox pool could not start a worker (%d): %s", self._failures, exc)
                if self._failures >= 3:
                    return
                continue
            with self._cond:
                if self._closed:
                    worker.kill()
                    return
                self._idle.append(worker)
                self._cond.notify_all()

    def take(self, wait_s: float = 0.0) -> WorkerProcess | None:
        with self._cond:
            if not self._idle and wait_s > 0:
                self._cond.wait_for(lambda: self._idle or self._closed, timeout=wait_s)
            while self._idle:
                worker = self._idle.pop(0)
                self._cond.notify_all()
                if worker.alive():
                    return worker
                worker.kill()
            return None

    def idle(self) -> int:
        with self._cond:
            return len(self._idle)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.kill()
        self._thread.join(timeout=60)


class Sandbox:
    """Entry point: ``with Sandbox(cfg) as sb, sb.session() as s: s.run(code, [img], out_dir)``.

    Raises :class:`~keye.sandbox.jail.SandboxUnavailable` at construction when no isolation is possible and the
    config does not allow running without it.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.jail = Jail.create(self.config)
        self._pool = WorkerPool(self.jail, self.config.pool_size) if self.config.pool_size > 0 else None
        self._sessions: list[SandboxSession] = []

    @property
    def isolation(self) -> str:
        return self.jail.kind

    def _acquire(self) -> WorkerProcess:
        worker = self._pool.take() if self._pool else None
        return worker if worker is not None else start_worker(self.jail)

    def wait_warm(self, timeout_s: float = 60.0) -> bool:
        """Block until at least one warm worker is idle (benchmarks and servers call this after start-up)."""
        if self._pool is None:
            return False
        worker = self._pool.take(wait_s=timeout_s)
        if worker is None:
            return False
        with self._pool._cond:
            self._pool._idle.insert(0, worker)
        return True

    def session(self) -> SandboxSession:
        self._sessions = [s for s in self._sessions if not s.closed]
        session = SandboxSession(self.config, self._acquire)
        self._sessions.append(session)
        return session

    def run(self, code: str, image_paths: Sequence[str] = (), out_dir: str | None = None) -> SandboxResult:
        """One block in a fresh trajectory (what ``keye sandbox`` does)."""
        with self.session() as session:
            return session.run(code, image_paths, out_dir)

    def close(self) -> None:
        for session in self._sessions:
            session.close()
        self._sessions = []
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
