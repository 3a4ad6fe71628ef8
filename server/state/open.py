"""``open_store(url)``: the store implementation a URL names.

Kept apart from ``base.py``: the implementations import the interface, and the
factory imports the implementations.
"""

from __future__ import annotations

from server.state.base import StateStore


def open_store(url: str, *, ttl_s: float, max_sessions: int, max_messages: int) -> StateStore:
    """A store from its URL: ``memory://``, ``sqlite:///relative.db`` / ``sqlite:////abs.db``,
    or ``redis://host:port/db`` (shared by replicas)."""
    scheme = url.split(":", 1)[0]
    if scheme == "memory":
        from server.state.memory import MemoryStore

        return MemoryStore(ttl_s=ttl_s, max_sessions=max_sessions, max_messages=max_messages)
    if scheme == "sqlite":
        from server.state.sqlite import SqliteStore

        # As in SQLAlchemy: sqlite:///relative.db, sqlite:////absolute/path.db
        return SqliteStore(url.removeprefix("sqlite:///"), max_messages=max_messages)
    if scheme in ("redis", "rediss", "unix"):
        from server.state.redis import RedisStore

        return RedisStore(url, ttl_s=ttl_s, max_messages=max_messages)
    raise ValueError(
        f"unsupported store URL {url!r} (use memory://, sqlite:///path or redis://host:port/db)"
    )
