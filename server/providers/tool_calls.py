"""Rebuilding complete tool calls from OpenAI-style streamed ``tool_calls`` deltas.

Arguments arrive in many small pieces and calls of one response are told apart by
``index``; this lives with the providers that decode such deltas
(:mod:`server.providers.openai_chat`). Running the calls is the session side's
business (:mod:`server.tools`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from duplex.protocol import ToolCall

logger = logging.getLogger(__name__)

__all__ = ["ToolCallAccumulator"]


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


class ToolCallAccumulator:
    """Rebuild complete tool calls from streamed ``choices[0].delta.tool_calls`` entries.

    OpenAI sends ``id`` and ``function.name`` once and the arguments JSON in many
    pieces; other compatible servers repeat id/name in every delta, stream names
    in pieces, or omit ``index``. All of these converge to the same calls here.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}
        self._last_index: int | None = None

    def __bool__(self) -> bool:
        return bool(self._calls)

    def feed(self, deltas: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Add one or several delta entries (dicts as parsed from the JSON chunk)."""
        for delta in [deltas] if isinstance(deltas, dict) else deltas:
            if not isinstance(delta, dict):
                logger.warning("ignoring tool-call delta that is not an object: %r", delta)
                continue
            index = self._index_of(delta)
            call = self._calls.setdefault(index, _PartialCall())
            self._last_index = index
            function = delta.get("function") or {}
            if not isinstance(function, dict):
                function = {}
            call.id = _merge_once(call.id, delta.get("id"))
            call.name = _merge_once(call.name, function.get("name"))
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.arguments += arguments
            elif isinstance(arguments, dict):
                # A few servers send the arguments already parsed.
                call.arguments += json.dumps(arguments, ensure_ascii=False)

    def _index_of(self, delta: dict[str, Any]) -> int:
        index = delta.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            return index
        # No index: a new id starts a new call, anything else continues the last one.
        new_id = delta.get("id")
        if self._last_index is None:
            return 0
        last = self._calls[self._last_index]
        if isinstance(new_id, str) and new_id and last.id and new_id != last.id:
            return max(self._calls) + 1
        return self._last_index

    def complete(self) -> tuple[list[ToolCall], list[str]]:
        """The complete calls in index order, and a reason for each call dropped.

        A call is dropped when it has no id or no name, or when its arguments are
        not a JSON object (an empty string counts as ``{}``): a truncated call
        cannot be executed or answered, and sending it back would make the
        upstream reject the whole conversation.
        """
        calls: list[ToolCall] = []
        dropped: list[str] = []
        for index in sorted(self._calls):
            partial = self._calls[index]
            label = f"tool call #{index} ({partial.name or 'no name'})"
            if not partial.id:
                dropped.append(f"{label}: missing id")
                continue
            if not partial.name:
                dropped.append(f"{label}: missing function name")
                continue
            arguments = partial.arguments.strip() or "{}"
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as exc:
                dropped.append(f"{label}: arguments are not valid JSON ({exc.msg})")
                continue
            if not isinstance(parsed, dict):
                dropped.append(f"{label}: arguments are not a JSON object")
                continue
            calls.append(ToolCall(id=partial.id, name=partial.name, arguments=arguments))
        for reason in dropped:
            logger.warning("dropping incomplete %s", reason)
        return calls, dropped


def _merge_once(current: str, new: Any) -> str:
    """Set-once field that tolerates repetition and pieces (see ToolCallAccumulator)."""
    if not isinstance(new, str) or not new or new == current:
        return current
    return current + new
