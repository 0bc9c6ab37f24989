"""Shared fixtures: offline hub, deterministic seeds, GPU marker handling, a private torch extensions folder."""

import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# JIT-built ops (DeepSpeed's CPU allreduce) go to a folder of this session's own, inherited by the runs it starts:
# no build shared with other sessions or with another torch version.
_EXTENSIONS_DIR = tempfile.mkdtemp(prefix="keye-test-torch-ext-")
os.environ["TORCH_EXTENSIONS_DIR"] = _EXTENSIONS_DIR
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_EXTENSIONS_DIR, ignore_errors=True)


# tools/gpu_check.sh --dry-run runs the GPU tests on the CPU (tiny sizes) so that they cannot rot between GPU sessions.
GPU_DRY_RUN = os.environ.get("KEYE_GPU_DRY_RUN") == "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or GPU_DRY_RUN:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu() -> torch.device:
    """The device of the ``gpu``-marked tests: CUDA, or the CPU in a GPU-check dry run."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def fresh_process_group(monkeypatch):
    """For a whole training run inside the test process: no inherited rank env, no DeepSpeed or sequence-parallel
    groups cached from an earlier run, and the process group torn down afterwards so later tests start clean."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    import keye.sequence_parallel as sp

    for k in _DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sp, "_GROUPS", None)
    for name, value in list(vars(groups).items()):  # DeepSpeed caches groups of a process group torn down below
        if name.startswith("_") and name[1:2].isupper() and (value is None or isinstance(value, dict)):
            monkeypatch.setattr(groups, name, dict(value) if isinstance(value, dict) else None)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for k in _DIST_ENV:
        os.environ.pop(k, None)
