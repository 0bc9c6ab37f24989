"""Data-loader workers: each one runs one thread per library (torch, OpenMP/MKL/BLAS, OpenCV) whatever its parent
uses, and the default worker count is the figure one GPU needs within the rank's share of the CPUs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from data_pipelines.media import VideoOptions
from data_pipelines.video_reader import decoder_threads
from train.config import LOADER_WORKERS_PER_GPU
from train.data import WORKER_THREAD_VARS, StreamData, loader_workers


class ThreadProbe(IterableDataset):
    """Yields, from inside the process that iterates it, the thread settings a media decode would run with (FFmpeg's:
    what ``load_video`` would give a video read with the default options)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield {
            "pid": os.getpid(),
            "torch": torch.get_num_threads(),
            "cv2": cv2.getNumThreads(),
            "ffmpeg": decoder_threads(VideoOptions()),
            "env": {var: os.environ.get(var) for var in WORKER_THREAD_VARS},
        }

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_a_worker_runs_one_thread_per_library_whatever_its_parent_uses(monkeypatch):
    parent_torch, parent_cv2 = torch.get_num_threads(), cv2.getNumThreads()
    for var in WORKER_THREAD_VARS:
        monkeypatch.setenv(var, "4")
    torch.set_num_threads(4)
    cv2.setNumThreads(4)
    image = np.zeros((1080, 1920, 3), dtype=np.uint8)
    cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # the parent's OpenCV pool now has threads (a forked worker once hung)
    try:
        probe = StreamData(ThreadProbe(), num_workers=1).next()
        in_process = StreamData(ThreadProbe(), num_workers=0).next()
    finally:
        torch.set_num_threads(parent_torch)
        cv2.setNumThreads(parent_cv2)
    assert probe["pid"] != os.getpid()
    assert probe["torch"] == probe["cv2"] == probe["ffmpeg"] == 1
    assert probe["env"] == dict.fromkeys(WORKER_THREAD_VARS, "1")
    # the trainer's own torch and environment are untouched (the model's CPU ops use them)
    assert in_process["torch"] == 4 and in_process["env"] == dict.fromkeys(WORKER_THREAD_VARS, "4")


@pytest.mark.parametrize(
    ("cpus", "ranks", "expected"),
    [(64, 1, LOADER_WORKERS_PER_GPU), (96, 8, min(LOADER_WORKERS_PER_GPU, 11)), (16, 8, 1), (2, 1, 1), (1, 1, 0)],
)
def test_default_workers_are_a_gpus_need_within_the_ranks_cpus(monkeypatch, cpus, ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert loader_workers(None) == expected
    assert loader_workers(3) == 3  # a configured number is kept
