"""The modes Duplex ships, by the name ``SessionConfig.mode`` uses."""

from __future__ import annotations

from server.modes.asm_mode import AsmMode
from server.modes.base import ModeFactory
from server.modes.vad_mode import VadMode


def builtin_modes() -> dict[str, ModeFactory]:
    """A fresh mapping for ``SessionServices.modes``: ``vad`` and ``asm``."""
    return {"vad": VadMode, "asm": AsmMode}
