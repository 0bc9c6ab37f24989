"""Thyme: the model writes Python in ``<code>`` blocks, a sandbox runs it, the output is spliced back into the same
assistant turn and generation continues (KEYE_FACTS B §1). ``ToolLoop`` is the loop (batched, GRPO-ATS sampling,
rollback/retry), ``ToolTrajectory`` its result (the exact token sequence plus a policy mask for RL),
``ToolChatEngine`` the eval-harness adapter, ``thyme_conversation`` the prompt format.
"""

from keye.thyme.config import ToolLoopConfig
from keye.thyme.engine import ToolChatEngine
from keye.thyme.loop import ToolEvent, ToolLoop, materialize_images
from keye.thyme.prompt import THYME_SYSTEM_PROMPT, add_thyme_prompt, thyme_conversation
from keye.thyme.trajectory import RoundRecord, SegmentRecord, ToolTrajectory

__all__ = [
    "THYME_SYSTEM_PROMPT",
    "RoundRecord",
    "SegmentRecord",
    "ToolChatEngine",
    "ToolEvent",
    "ToolLoop",
    "ToolLoopConfig",
    "ToolTrajectory",
    "add_thyme_prompt",
    "materialize_images",
    "thyme_conversation",
]
