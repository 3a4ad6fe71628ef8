"""docs/protocol.md is the authority on the wire: every server message the code emits is in it."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from duplex import protocol

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def server_message_types() -> set[str]:
    """Every ``type`` value of the server-message union, read from the models themselves."""
    union = typing.get_args(protocol.ServerMessage)[0]  # Annotated[Union[...], Field]
    types: set[str] = set()
    for model in typing.get_args(union):
        annotation = model.model_fields["type"].annotation
        types.update(typing.get_args(annotation))
    return types


def documented_types() -> set[str]:
    """Message types named in a heading of the doc (``### `tool.output` ...``)."""
    types: set[str] = set()
    for line in DOC.read_text().splitlines():
        if re.match(r"#{2,4} ", line):
            types.update(re.findall(r"`([a-z][a-z_.]*)`", line))
    return types


def test_the_union_is_introspected() -> None:
    types = server_message_types()
    assert {"session.created", "chunk", "response.done", "error", "pong"} <= types
    assert len(types) == len(typing.get_args(typing.get_args(protocol.ServerMessage)[0]))


def test_every_server_message_is_documented() -> None:
    missing = sorted(server_message_types() - documented_types())
    assert not missing, f"server messages missing from docs/protocol.md: {missing}"


def test_every_documented_message_exists() -> None:
    documented = {t for t in documented_types() if t not in protocol.CLIENT_MESSAGE_TYPES}
    unknown = sorted(documented - server_message_types())
    assert not unknown, f"docs/protocol.md documents server messages the code lacks: {unknown}"
