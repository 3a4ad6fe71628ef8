"""G.711 encoding (PCM s16 -> mu-law / A-law bytes) by table, the inverse of `media.audio`'s
decoders.

A 65,536-entry table per law, built once from the ITU-T G.711 compression formula
(as in the reference linear2ulaw / linear2alaw), makes encoding one numpy gather per
chunk and keeps no state: a sample encodes the same wherever a chunk boundary falls.
"""

from __future__ import annotations

import numpy as np

_SEG_UEND = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_SEG_AEND = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _segment(value: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Index of the first segment end >= value (8 when above all of them)."""
    return np.searchsorted(ends, value, side="left").astype(np.int32)


def _ulaw_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # 14-bit magnitude domain
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + 0x21  # clip, then bias (0x84 >> 2)
    seg = _segment(magnitude, _SEG_UEND)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((magnitude >> (seg + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


def _alaw_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # 13-bit magnitude domain
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    magnitude = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = _segment(magnitude, _SEG_AEND)
    shifted = np.where(seg < 2, magnitude >> 1, magnitude >> np.maximum(seg, 1))
    code = np.where(seg >= 8, 0x7F, (seg << 4) | (shifted & 0x0F))
    return (code ^ mask).astype(np.uint8)


PCM16_TO_MULAW = _ulaw_table()
PCM16_TO_ALAW = _alaw_table()
PCM16_TO_MULAW.flags.writeable = False
PCM16_TO_ALAW.flags.writeable = False


def encode(pcm: bytes, law: str) -> bytes:
    """PCM s16le mono bytes -> one G.711 byte per sample (``law``: "mulaw" or "alaw")."""
    if law not in ("mulaw", "alaw"):
        raise ValueError(f"law must be 'mulaw' or 'alaw', not {law!r}")
    table = PCM16_TO_MULAW if law == "mulaw" else PCM16_TO_ALAW
    samples = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)
    return table[samples.astype(np.int32) + 32768].tobytes()
