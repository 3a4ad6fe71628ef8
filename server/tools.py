"""Tool calling for per-turn (VAD mode) providers.

Three pieces, each independent of the session and the socket:

* :class:`ToolCallAccumulator` rebuilds complete calls from OpenAI-style streamed
  ``tool_calls`` deltas (arguments arrive in many small pieces, calls of one
  response are told apart by ``index``).
* :class:`ToolRegistry` holds the *server-side* tools of one app: async Python
  callables with a JSON-schema signature and a timeout. A failing tool becomes an
  ``{"error": ...}`` result the model can read, never a failed session.
* :func:`run_tool_loop` drives "model asks for tools -> run them -> ask the model
  again" until the model answers with text, up to a hop limit.

History convention (shared with :mod:`server.providers.openai_chat`): a tool
exchange is stored as plain :class:`~duplex.protocol.Message` objects:

* the model's request: ``Message(role="assistant", content=<text said with it>,
  metadata={"tool_calls": [{"id", "name", "arguments"}, ...]})``
* each result: ``Message(role="tool", content=<output string>,
  metadata={"tool_call_id": <id>, "name": <tool name>})``

Messages produced during the current turn also carry ``metadata["turn_id"]`` so a
provider can place them *after* the turn's user content (which is not yet in the
history while the turn is being answered); see :func:`with_tool_messages`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from duplex.protocol import FinishReason, Message, StreamChunk, ToolCall, ToolSpec
from server.providers.base import TurnRequest, closing_stream

logger = logging.getLogger(__name__)

__all__ = [
    "RegisteredTool",
    "ToolCallAccumulator",
    "ToolRegistry",
    "run_tool_loop",
    "tool_call_message",
    "tool_result_message",
    "with_tool_messages",
]


# --------------------------------------------------------------------------------------
# Accumulating streamed tool-call deltas


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


# --------------------------------------------------------------------------------------
# Server-side tools

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True, slots=True)
class RegisteredTool:
    spec: ToolSpec
    fn: Callable[..., Awaitable[Any]]
    timeout_s: float


class ToolRegistry:
    """The server-side tools of one app; create one per app and pass it in.

    Usage::

        tools = ToolRegistry()

        @tools.register(parameters={"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]}, timeout_s=5)
        async def get_weather(city: str) -> dict:
            "Current weather for a city."
            ...
    """

    def __init__(self, default_timeout_s: float = 10.0) -> None:
        self.default_timeout_s = default_timeout_s
        self._tools: dict[str, RegisteredTool] = {}

    def register(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Register ``fn`` (called directly) or return a decorator (called without ``fn``).

        ``description`` defaults to the first paragraph of the docstring; the
        name must satisfy :class:`ToolSpec`'s pattern and be unique.
        """

        def add(func: F) -> F:
            if not inspect.iscoroutinefunction(func):
                raise TypeError(f"tool {func!r} must be an async function")
            tool_name = name or func.__name__
            if tool_name in self._tools:
                raise ValueError(f"tool {tool_name!r} is already registered")
            doc = inspect.getdoc(func) or ""
            spec = ToolSpec(
                name=tool_name,
                description=description if description is not None else doc.split("\n\n")[0],
                parameters=parameters
                if parameters is not None
                else {"type": "object", "properties": {}},
            )
            timeout = self.default_timeout_s if timeout_s is None else timeout_s
            if timeout <= 0:
                raise ValueError("timeout_s must be positive")
            self._tools[tool_name] = RegisteredTool(spec=spec, fn=func, timeout_s=timeout)
            return func

        return add(fn) if fn is not None else add

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    def merge_specs(self, client_specs: list[ToolSpec]) -> list[ToolSpec]:
        """Server tools plus the client's declared tools; a server tool wins a name clash
        (because :func:`run_tool_loop` runs any name found in the registry here)."""
        return self.specs() + [s for s in client_specs if s.name not in self._tools]

    async def run(self, call: ToolCall) -> str:
        """Run one call and return its JSON-encoded result.

        Bad arguments, exceptions and timeouts return ``{"error": "..."}`` so the
        model sees the failure and the turn goes on. Cancellation propagates.
        """
        tool = self._tools.get(call.name)
        if tool is None:
            return _error_result(f"unknown tool: {call.name}")
        try:
            args = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return _error_result(f"invalid arguments JSON: {exc.msg}")
        if not isinstance(args, dict):
            return _error_result("arguments must be a JSON object")
        try:
            async with asyncio.timeout(tool.timeout_s) as scope:
                result = await tool.fn(**args)
        except TimeoutError:
            if scope.expired():
                logger.warning("tool %s timed out after %ss", call.name, tool.timeout_s)
                return _error_result(f"tool {call.name} timed out after {tool.timeout_s:g}s")
            logger.warning("tool %s raised TimeoutError", call.name, exc_info=True)
            return _error_result(f"tool {call.name} failed: TimeoutError")
        except TypeError as exc:
            # Most often the model passed arguments the function does not take.
            logger.warning("tool %s rejected its arguments: %s", call.name, exc)
            return _error_result(f"tool {call.name} failed: TypeError: {exc}")
        except Exception as exc:
            logger.warning("tool %s failed", call.name, exc_info=True)
            return _error_result(f"tool {call.name} failed: {type(exc).__name__}: {exc}")
        try:
            return json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError) as exc:
            return _error_result(f"tool {call.name} returned an unserialisable result: {exc}")


def _error_result(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


# --------------------------------------------------------------------------------------
# History helpers


def tool_call_message(
    calls: list[ToolCall], content: str = "", turn_id: str | None = None
) -> Message:
    """The assistant message that asked for ``calls`` (see the module docstring)."""
    metadata: dict[str, Any] = {"tool_calls": [call.model_dump() for call in calls]}
    if turn_id is not None:
        metadata["turn_id"] = turn_id
    return Message(role="assistant", content=content, metadata=metadata)


def tool_result_message(call: ToolCall, output: str, turn_id: str | None = None) -> Message:
    metadata: dict[str, Any] = {"tool_call_id": call.id, "name": call.name}
    if turn_id is not None:
        metadata["turn_id"] = turn_id
    return Message(role="tool", content=output, metadata=metadata)


def with_tool_messages(request: TurnRequest, messages: list[Message]) -> TurnRequest:
    """A copy of a ``TurnRequest`` whose history ends with this turn's tool exchange.

    Each message is stamped with ``metadata["turn_id"] = request.turn_id`` so the
    provider puts it after the turn's user content (text, frames, audio), which is
    sent again unchanged on every hop.
    """
    stamped = [
        m
        if m.metadata.get("turn_id") == request.turn_id
        else m.model_copy(update={"metadata": {**m.metadata, "turn_id": request.turn_id}})
        for m in messages
    ]
    return dataclasses.replace(request, history=[*request.history, *stamped])


# --------------------------------------------------------------------------------------
# The loop

_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


async def run_tool_loop(
    call_model: Callable[[list[Message]], AsyncIterator[StreamChunk]],
    registry: ToolRegistry | None,
    *,
    client_tool: Callable[[ToolCall], Awaitable[str]] | None = None,
    hop_limit: int = 5,
    new_messages: list[Message] | None = None,
    turn_id: str | None = None,
) -> AsyncIterator[StreamChunk]:
    """Answer one turn, running tools the model asks for, and stream everything out.

    ``call_model(messages)`` starts one model call; ``messages`` is this turn's
    tool exchange so far (empty on the first call) — typically
    ``lambda extra: provider.stream(with_tool_messages(request, extra))``.

    Yields, in order:

    * the model's chunks at once (text deltas, warnings), without their
      ``finish_reason``/``tool_calls``;
    * when the model asks for tools: ``StreamChunk(tool_calls=[...])`` with the calls
      the *client* must run (names not in ``registry``; run via ``client_tool``,
      which owns its timeout), then ``StreamChunk(metadata={"kind": "tool_execution",
      "calls": [names], "call_ids": [ids]})``; the calls of one response run
      concurrently; then one ``StreamChunk(metadata={"kind": "tool_result",
      "call_id", "name", "output"})`` per call, in call order; then the next hop;
    * when more than ``hop_limit`` rounds of tools would be needed:
      ``StreamChunk(metadata={"kind": "warning", "code": "tool_limit_reached", ...})``
      and the final chunk with ``finish_reason="tool_limit_reached"`` (the last
      requested calls are not run);
    * last: ``StreamChunk(finish_reason=..., metadata={"usage": <summed over hops>,
      "hops": n})``.

    ``new_messages`` (if given) receives the messages to persist after the user's
    message, as they happen: each hop's assistant tool-call message and tool
    results, and — when the model ends normally — the final assistant message
    (text of the last hop only; earlier hops' text lives in their tool-call
    messages); at the hop limit, the last hop's text without its unrun calls. On
    cancellation it holds the complete exchanges only.

    A "hop" is one round of running tools and calling the model again, so a
    turn makes at most ``hop_limit + 1`` model calls.
    """
    messages: list[Message] = []
    sink = new_messages if new_messages is not None else []
    usage: dict[str, Any] = {}
    hops = 0
    while True:
        text_parts: list[str] = []
        calls: list[ToolCall] = []
        finish: str | None = None
        async with closing_stream(call_model(list(messages))) as stream:
            async for chunk in stream:
                if chunk.tool_calls:
                    calls.extend(chunk.tool_calls)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                if chunk.delta:
                    text_parts.append(chunk.delta)
                if (
                    (chunk.delta or chunk.media is not None)
                    and chunk.tool_calls is None
                    and chunk.finish_reason is None
                    and chunk.metadata is None
                ):
                    yield chunk  # plain text or audio, the bulk of any stream: as it is
                    continue
                # Everything else goes out at once; usage is summed for the final chunk.
                metadata = dict(chunk.metadata or {})
                _add_usage(usage, metadata.pop("usage", None))
                passthrough = chunk.model_copy(
                    update={"finish_reason": None, "tool_calls": None, "metadata": metadata or None}
                )
                if _has_payload(passthrough):
                    yield passthrough
        text = "".join(text_parts)

        if not calls:
            sink.append(_assistant_message(text, turn_id))
            yield StreamChunk(
                finish_reason=_final_reason(finish), metadata=_final_meta(usage, hops)
            )
            return

        if hops >= hop_limit:
            names = [c.name for c in calls]
            logger.warning("tool hop limit %d reached; not running %s", hop_limit, names)
            if text:
                # What the user heard is kept; the calls that were not run are not.
                sink.append(_assistant_message(text, turn_id))
            yield StreamChunk(
                metadata={
                    "kind": "warning",
                    "code": "tool_limit_reached",
                    "message": f"tool hop limit ({hop_limit}) reached; calls not run: {names}",
                    "calls": names,
                }
            )
            yield StreamChunk(finish_reason="tool_limit_reached", metadata=_final_meta(usage, hops))
            return

        hops += 1
        client_calls = [c for c in calls if registry is None or c.name not in registry]
        if client_calls:
            yield StreamChunk(tool_calls=client_calls)
        yield StreamChunk(
            metadata={
                "kind": "tool_execution",
                "calls": [c.name for c in calls],
                "call_ids": [c.id for c in calls],
                "hop": hops,
            }
        )
        outputs = await _run_calls(calls, registry, client_tool)
        call_msg = tool_call_message(calls, text, turn_id)
        result_msgs = [
            tool_result_message(c, out, turn_id) for c, out in zip(calls, outputs, strict=True)
        ]
        messages.append(call_msg)
        messages.extend(result_msgs)
        sink.append(call_msg)
        sink.extend(result_msgs)
        for call, output in zip(calls, outputs, strict=True):
            yield StreamChunk(
                metadata={
                    "kind": "tool_result",
                    "call_id": call.id,
                    "name": call.name,
                    "output": output,
                }
            )


async def _run_calls(
    calls: list[ToolCall],
    registry: ToolRegistry | None,
    client_tool: Callable[[ToolCall], Awaitable[str]] | None,
) -> list[str]:
    """Run all calls of one response concurrently; results in call order."""

    async def one(call: ToolCall) -> str:
        if registry is not None and call.name in registry:
            return await registry.run(call)
        if client_tool is None:
            return _error_result(f"unknown tool: {call.name}")
        try:
            output = await client_tool(call)
        except TimeoutError:
            logger.warning("client tool %s timed out", call.name)
            return _error_result(f"client tool {call.name} timed out")
        except Exception as exc:
            logger.warning("client tool %s failed", call.name, exc_info=True)
            return _error_result(f"client tool {call.name} failed: {exc}")
        return output if isinstance(output, str) else json.dumps(output, default=str)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(call)) for call in calls]
    return [task.result() for task in tasks]


def _assistant_message(text: str, turn_id: str | None) -> Message:
    return Message(
        role="assistant",
        content=text,
        metadata={"turn_id": turn_id} if turn_id is not None else {},
    )


def _has_payload(chunk: StreamChunk) -> bool:
    return any(
        getattr(chunk, field) is not None
        for field in ("delta", "content", "media", "tool_calls", "error", "interrupted", "metadata")
    )


def _final_meta(usage: dict[str, Any], hops: int) -> dict[str, Any]:
    return {"usage": usage, "hops": hops} if usage else {"hops": hops}


def _final_reason(finish: str | None) -> FinishReason:
    # A model that announced tool calls but whose calls were all dropped has
    # nothing left to do: the turn ends as a normal stop (warnings already sent).
    if finish is None or finish == "tool_calls":
        return "stop"
    return finish  # type: ignore[return-value]


def _add_usage(total: dict[str, Any], usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    for key in _USAGE_KEYS:
        value = usage.get(key)
        if isinstance(value, int):
            total[key] = total.get(key, 0) + value
