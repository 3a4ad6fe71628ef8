"""Media errors carry the wire error code, so callers map them without knowing each failure."""

from __future__ import annotations


class MediaError(Exception):
    """A media input that cannot be used.

    ``code`` follows the wire protocol's error codes: 400 (malformed or
    inconsistent with what was declared), 413 (too large) and 415
    (unsupported or undecodable).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Corrupt(Exception):
    """Container or bitstream data that cannot be right (raised and caught inside media/).

    The parsers turn it into a ``MediaError`` with ``code``: 415, or 413 for an element
    larger than they accept.
    """

    def __init__(self, message: str, code: int = 415) -> None:
        super().__init__(message)
        self.code = code
