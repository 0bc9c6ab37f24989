"""Thyme's code sandbox, made a real one: each trajectory's code runs in its own jailed, resource-limited process.

Use::

    from keye.sandbox import Sandbox, SandboxConfig, extract_code
    with Sandbox(SandboxConfig()) as sandbox, sandbox.session() as session:
        result = session.run(extract_code(model_text), [image_path], out_dir)
"""

from keye.sandbox.config import SandboxConfig
from keye.sandbox.executor import SandboxSession, SandboxStartError
from keye.sandbox.jail import SandboxUnavailable
from keye.sandbox.pool import Sandbox
from keye.sandbox.repair import extract_code, repair_code
from keye.sandbox.result import SandboxResult

__all__ = [
    "Sandbox",
    "SandboxConfig",
    "SandboxResult",
    "SandboxSession",
    "SandboxStartError",
    "SandboxUnavailable",
    "extract_code",
    "repair_code",
]
