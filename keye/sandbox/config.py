"""``SandboxConfig``: every limit the Thyme sandbox enforces, as one typed dataclass (YAML/dotlist via typed_config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SandboxConfig:
    """Defaults follow Thyme (10 s per block) with limits sized for image crops/resizes, not general compute."""

    timeout_s: float = 10.0  # wall clock per code block; the worker raises at this point, the parent kills after grace
    kill_grace_s: float = 1.0  # extra wall time before the parent kills a worker that ignores the timeout
    cpu_time_s: float = 10.0  # CPU seconds per code block (catches busy threads the wall clock would also catch)
    session_cpu_s: float = 300.0  # hard CPU cap for one trajectory's worker; exceeding it kills the worker
    memory_mb: int = 2048  # address-space limit of every jailed process
    max_processes: int = 32  # processes + threads the jailed uid may own (fork bombs stop here)
    disk_mb: int = 256  # size of the work dir (a tmpfs) = everything the code may write
    max_file_mb: int = 64  # largest single file the code may write (RLIMIT_FSIZE)
    max_stdout_chars: int = 8192  # stdout beyond this is dropped and a truncation note appended
    max_images: int = 6  # output images returned per block
    max_image_mb: int = 16  # largest output image file returned
    max_input_mb: int = 64  # largest input image copied into the work dir
    max_output_pixels: int = 16_777_216  # width*height of a returned image (about Keye's max_pixels)
    max_aspect_ratio: float = 200.0  # Thyme's guard against degenerate crops
    pool_size: int = 2  # warm workers kept ready; 0 starts every trajectory cold
    isolation: str = "auto"  # auto | bwrap | none ("none" needs allow_unisolated)
    allow_unisolated: bool = False  # run with rlimits only when no namespace isolation is available
    uid: int = 65534  # unprivileged uid/gid the code runs as (nobody)
    gid: int = 65534
    startup_timeout_s: float = 60.0  # a worker that is not ready by then counts as failed to start
    workdir: str = "/mnt/data"  # where the work dir appears inside the jail (Thyme's models expect /mnt/data)
