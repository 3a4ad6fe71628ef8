"""Tool calling on the session side: the registry, the executor and the per-turn loop.

* :class:`ToolRegistry` holds the *server-side* tools of one app: async Python
  callables with a JSON-schema signature and a timeout. A failing tool becomes an
  ``{"error": ...}`` result the model can read, never a failed session.
* :func:`execute_tool_calls` runs one round of calls the model asked for and
  streams its typed events; VAD mode (through :func:`run_tool_loop`) and ASM mode
  both run tools through it, so the client sees the same events in both.
* :class:`ClientToolWaiters` waits (bounded) for the client's ``tool.result``;
  :class:`RunningCalls` lets a provider's cancellation stop server calls mid-run.
* :func:`run_tool_loop` drives "model asks for tools -> run them -> ask the model
  again" for per-turn (VAD mode) providers, until the model answers with text,
  up to a hop limit.

Rebuilding calls from streamed deltas is the providers' business
(:mod:`server.providers.tool_calls`).

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
import importlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from duplex.protocol import (
    BAD_REQUEST,
    FinishReason,
    Message,
    ProtocolError,
    StreamChunk,
    ToolCall,
    ToolEvent,
    ToolExecution,
    ToolOutput,
    ToolSpec,
    WarningEvent,
)
from server.providers.base import TurnRequest, closing_stream

logger = logging.getLogger(__name__)

__all__ = [
    "ClientToolWaiters",
    "RegisteredTool",
    "RunningCalls",
    "ToolRegistry",
    "execute_tool_calls",
    "run_tool_loop",
    "tool_call_message",
    "tool_result_message",
    "with_tool_messages",
]


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

    def include(self, other: ToolRegistry) -> None:
        """Add every tool of ``other`` (a name already here is an error)."""
        for tool_name, tool in other._tools.items():
            if tool_name in self._tools:
                raise ValueError(f"tool {tool_name!r} is already registered")
            self._tools[tool_name] = tool

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


def load_tools(refs: Iterable[str], registry: ToolRegistry | None = None) -> ToolRegistry:
    """Server tools from entry points, as ``duplex serve --tools module:attribute`` takes them.

    ``attribute`` (dotted for nested names) is a :class:`ToolRegistry`, whose tools
    are added, or a function that takes the registry and registers tools on it.
    Raises ValueError with the reference when it cannot be loaded.
    """
    registry = registry if registry is not None else ToolRegistry()
    for ref in refs:
        module_name, sep, attr = ref.strip().partition(":")
        if not (sep and module_name and attr):
            raise ValueError(f"--tools {ref!r}: expected module:attribute")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--tools {ref!r}: cannot load it ({exc})") from exc
        if isinstance(target, ToolRegistry):
            registry.include(target)
        elif callable(target) and not inspect.iscoroutinefunction(target):
            target(registry)
        else:
            raise ValueError(
                f"--tools {ref!r}: expected a ToolRegistry or a function taking one, "
                f"not {type(target).__name__}"
            )
    return registry


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
# One round of tool calls (both modes)

#: What the client-tool callable of :func:`execute_tool_calls` does: ask the client
#: to run the call and return its output (any JSON value, or a string).
ClientTool = Callable[[ToolCall], Awaitable[Any]]


async def execute_tool_calls(
    calls: list[ToolCall],
    registry: ToolRegistry | None,
    client_tool: ClientTool | None,
    *,
    hop: int,
    response_id: str = "",
    running: RunningCalls | None = None,
) -> AsyncIterator[StreamChunk | ToolExecution | ToolOutput]:
    """Run one round of calls (all concurrently) and stream what the client is told.

    Yields, in order: ``StreamChunk(tool_calls=[...])`` with the calls the *client*
    must run (names not in ``registry``; ``client_tool`` waits for each answer and
    owns its timeout), if any; one :class:`ToolExecution` naming every call of the
    round; then one :class:`ToolOutput` per call, in call order (the outputs given
    to the model). Server calls run in ``registry``; failures become
    ``{"error": ...}`` outputs. With ``running``, each server call can be stopped
    by id while it runs (its output is then :data:`CANCELLED_OUTPUT`).
    """
    client_calls = [c for c in calls if registry is None or c.name not in registry]
    if client_calls:
        yield StreamChunk(response_id=response_id, tool_calls=client_calls)
    yield ToolExecution(
        response_id=response_id,
        calls=[c.name for c in calls],
        call_ids=[c.id for c in calls],
        hop=hop,
    )
    outputs = await _run_calls(calls, registry, client_tool, running)
    for call, output in zip(calls, outputs, strict=True):
        yield ToolOutput(response_id=response_id, call_id=call.id, name=call.name, output=output)


#: The output of a call the provider withdrew while it ran.
CANCELLED_OUTPUT = json.dumps({"error": "tool call cancelled by the provider"})


class RunningCalls:
    """Server calls running now, by call id, so a provider's cancellation can stop them."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[str]] = {}

    async def run(self, call: ToolCall, registry: ToolRegistry) -> str:
        """``registry.run(call)`` in its own task; :data:`CANCELLED_OUTPUT` if ``cancel``
        stopped it (a cancellation of the caller itself goes on up)."""
        task = asyncio.create_task(registry.run(call), name=f"tool:{call.name}")
        self._tasks[call.id] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                return CANCELLED_OUTPUT
            task.cancel()
            raise
        finally:
            self._tasks.pop(call.id, None)

    def cancel(self, call_ids: Iterable[str]) -> list[str]:
        """Stop the calls among ``call_ids`` that are running; returns their ids."""
        stopped = []
        for call_id in call_ids:
            task = self._tasks.get(call_id)
            if task is not None and not task.done():
                task.cancel()
                stopped.append(call_id)
        return stopped


class ClientToolWaiters:
    """Calls sent to the client, each waiting (at most ``timeout_s``) for its ``tool.result``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._waiters: dict[str, asyncio.Future[Any]] = {}

    async def __call__(self, call: ToolCall) -> Any:
        """The client's output for ``call`` (the call went out as ``chunk.tool_calls``)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[call.id] = waiter
        try:
            async with asyncio.timeout(self.timeout_s):
                return await waiter
        finally:
            self._waiters.pop(call.id, None)

    def resolve(self, call_id: str, output: Any) -> None:
        """Hand over the client's ``tool.result``; ProtocolError(400) if nothing waits for it."""
        waiter = self._waiters.pop(call_id, None)
        if waiter is None or waiter.done():
            raise ProtocolError(BAD_REQUEST, f"no tool call {call_id!r} is waiting for a result")
        waiter.set_result(output)

    def withdraw(self, call_ids: list[str]) -> None:
        """Calls the provider cancelled: stop waiting, the model gets an error output."""
        for call_id in call_ids:
            waiter = self._waiters.pop(call_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result({"error": "tool call cancelled by the provider"})

    def cancel_all(self) -> None:
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()


# --------------------------------------------------------------------------------------
# The loop (per-turn providers)

_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


async def run_tool_loop(
    call_model: Callable[[list[Message]], AsyncIterator[StreamChunk]],
    registry: ToolRegistry | None,
    *,
    client_tool: ClientTool | None = None,
    hop_limit: int = 5,
    new_messages: list[Message] | None = None,
    turn_id: str | None = None,
) -> AsyncIterator[StreamChunk | ToolEvent]:
    """Answer one turn, running tools the model asks for, and stream everything out.

    ``call_model(messages)`` starts one model call; ``messages`` is this turn's
    tool exchange so far (empty on the first call) — typically
    ``lambda extra: provider.stream(with_tool_messages(request, extra))``.

    Yields, in order:

    * the model's chunks at once (text deltas), without their
      ``finish_reason``/``tool_calls``; warnings a provider put in
      ``metadata["warnings"]`` become :class:`WarningEvent` (code ``provider_stream``);
    * when the model asks for tools: what :func:`execute_tool_calls` yields
      (client calls in ``chunk.tool_calls``, :class:`ToolExecution`, one
      :class:`ToolOutput` per call); then the next hop;
    * when more than ``hop_limit`` rounds of tools would be needed: a
      :class:`WarningEvent` with code ``tool_limit_reached`` and the final chunk
      with ``finish_reason="tool_limit_reached"`` (the last requested calls are
      not run);
    * last: ``StreamChunk(finish_reason=..., metadata={"usage": <summed over hops>,
      "hops": n})``, each key only when there is usage / at least one tool round.

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
                for warning in _pop_warnings(metadata):
                    yield WarningEvent(code="provider_stream", message=warning)
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
            yield WarningEvent(
                code="tool_limit_reached",
                message=f"tool hop limit ({hop_limit}) reached; calls not run: {names}",
                calls=names,
            )
            yield StreamChunk(finish_reason="tool_limit_reached", metadata=_final_meta(usage, hops))
            return

        hops += 1
        results: list[ToolOutput] = []
        async with aclosing(execute_tool_calls(calls, registry, client_tool, hop=hops)) as events:
            async for event in events:
                if isinstance(event, ToolOutput):
                    results.append(event)  # all come at once, after every call has run
                else:
                    yield event
        # The exchange is complete (and kept, even if the turn is cut now) before
        # its results go out.
        call_msg = tool_call_message(calls, text, turn_id)
        result_msgs = [
            tool_result_message(c, r.output, turn_id) for c, r in zip(calls, results, strict=True)
        ]
        messages.append(call_msg)
        messages.extend(result_msgs)
        sink.append(call_msg)
        sink.extend(result_msgs)
        for result in results:
            yield result


async def _run_calls(
    calls: list[ToolCall],
    registry: ToolRegistry | None,
    client_tool: ClientTool | None,
    running: RunningCalls | None = None,
) -> list[str]:
    """Run all calls of one response concurrently; results in call order."""

    async def one(call: ToolCall) -> str:
        if registry is not None and call.name in registry:
            if running is not None:
                return await running.run(call, registry)
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


def _pop_warnings(metadata: dict[str, Any]) -> list[str]:
    warnings = metadata.pop("warnings", None)
    if not isinstance(warnings, list):
        return []
    return [str(w) for w in warnings]


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


def _final_meta(usage: dict[str, Any], hops: int) -> dict[str, Any] | None:
    """Usage and tool rounds, when there are any: a plain answer carries no metadata."""
    meta: dict[str, Any] = {"usage": usage} if usage else {}
    if hops:
        meta["hops"] = hops
    return meta or None


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
