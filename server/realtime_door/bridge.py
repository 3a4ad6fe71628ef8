"""One Realtime connection: client events -> `DuplexSession` calls, and the session's
messages -> GA Realtime server events.

The session does the work (turns, VAD, providers, tools, storage); the bridge keeps
what the Realtime protocol adds on top: conversation items with their ids, the
response being streamed as output items and content parts, audio held until a manual
commit, function-call outputs held until ``response.create``.

Events the bridge makes itself (``conversation.item.added`` for a client item, errors,
...) travel through the session's output queue as `DoorEvent`, so they keep their
place among the session's own messages: one writer, one order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic_core import from_json

from duplex.protocol import (
    ChunkEvent,
    ErrorEvent,
    ImageFrame,
    InputAudioConfig,
    JsonLimits,
    Message,
    Playback,
    ProtocolError,
    ResponseDone,
    ResponseStarted,
    SessionCreated,
    SpeechStarted,
    SpeechStopped,
    TextChunk,
    ToolResult,
    Transcript,
    TurnEnded,
    check_json_value,
    parse_json,
)
from media import g711
from server.rate import InputBudget, audio_bytes_per_second
from server.realtime_door import history
from server.realtime_door.errors import DoorError, duplex_error_body, error_body
from server.realtime_door.session_map import (
    RealtimeSessionState,
    format_object,
    parse_modalities,
)
from server.session import DuplexSession
from server.state.base import StoreUnavailable

#: Conversation items remembered for retrieve / delete / truncate (oldest forgotten).
MAX_ITEMS = 1000
#: Turn ids -> user item ids remembered (transcripts arrive after the turn).
MAX_TURNS = 64
#: Function-call outputs kept for the next response.create (oldest dropped).
MAX_OUTPUTS = 64
#: ``metadata`` of a response: at most 16 pairs, keys of 64 and values of 512 characters.
MAX_METADATA = (16, 64, 512)
_TEXT_PARTS = ("input_text", "text", "output_text")
_G711 = {"audio/pcmu": "mulaw", "audio/pcma": "alaw"}
_APPEND = '"input_audio_buffer.append"'
_STATUS = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "tool_limit_reached": ("incomplete", {"type": "incomplete", "reason": "tool_limit_reached"}),
    "length": ("incomplete", {"type": "incomplete", "reason": "max_output_tokens"}),
    "interrupted": ("cancelled", {"type": "cancelled", "reason": "turn_detected"}),
    "cancelled": ("cancelled", {"type": "cancelled", "reason": "client_cancelled"}),
}

Event = dict[str, Any]


class DoorEvent(BaseModel):
    """Server events made by the bridge, queued in order with the session's messages."""

    seq: int = 0
    events: list[Event]


def new_item_id() -> str:
    return "item_" + uuid.uuid4().hex[:20]


@dataclass
class _Item:
    item: Event
    #: The Duplex turn (user items) or response (assistant items) it stands for.
    turn_id: str | None = None
    response_id: str | None = None
    audio_ms: float = 0.0


@dataclass
class _Response:
    id: str
    duplex_id: str
    modalities: list[str]
    output: list[Event] = field(default_factory=list)
    message: _Item | None = None
    text: list[str] = field(default_factory=list)
    restore_instructions: bool = False
    #: "none": out of band, its items join no conversation.
    conversation: str = "auto"
    metadata: dict[str, str] | None = None

    @property
    def audio(self) -> bool:
        return "audio" in self.modalities

    @property
    def in_conversation(self) -> bool:
        return self.conversation != "none"


class RealtimeBridge:
    def __init__(
        self, session: DuplexSession, state: RealtimeSessionState, json_limits: JsonLimits
    ) -> None:
        self.session = session
        self.state = state
        self._json_limits = json_limits
        self._event_prefix = "event_" + uuid.uuid4().hex[:8]
        self._event_n = itertools.count(1)
        self._conversation_id = "conv_" + session.id.removeprefix("sess_")
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self._last_item: str | None = None
        # Audio: the user item the speech being heard will become; manual-mode buffers.
        self._speech_item: str | None = None
        self._buffer = bytearray()
        self._committed: list[tuple[str, bytes]] = []
        self._commit_items: deque[str] = deque()
        self._pending_user_items: list[str] = []
        #: User items of turns held unanswered (``create_response: false``).
        self._held_items: list[str] = []
        self._turn_items: OrderedDict[str, str] = OrderedDict()
        #: Audio went to the session since the last user audio item (server VAD), and
        #: the latest such item (for transcripts a provider sends without a turn id).
        self._uncommitted = False
        self._last_audio_item: str | None = None
        self._partial = ""  # the partial transcript so far
        # Responses: requested (waiting for the session to start one), streaming, and
        # a response paused on function calls until the client's outputs and response.create.
        self._requested: deque[dict[str, Any]] = deque()
        #: Out-of-band responses requested, by the turn id the session gave them.
        self._requested_turns: dict[str, dict[str, Any]] = {}
        self._response: _Response | None = None
        self._awaiting: str | None = None
        self._awaiting_calls: list[str] = []
        self._outputs: dict[str, str] = {}
        self._continuations = itertools.count(2)
        #: Bringing the session's instructions back after a response that had its own;
        #: the next client event waits for it.
        self._restoring: asyncio.Task[None] | None = None
        #: Input bytes a second for the budget, and the input format it is for.
        self._rate_of: InputAudioConfig | None = None
        self._rate = 1.0
        self._handlers: dict[str, Callable[[Event, str | None], Awaitable[None]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.retrieve": self._item_retrieve,
            "conversation.item.delete": self._item_delete,
            "conversation.item.truncate": self._item_truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "output_audio_buffer.clear": self._output_clear,
        }

    # ---- events out -----------------------------------------------------------------

    def event(self, type: str, **fields: Any) -> Event:
        return {"type": type, "event_id": f"{self._event_prefix}{next(self._event_n):x}", **fields}

    async def _emit(self, *events: Event) -> None:
        await self.session.emit(DoorEvent(events=list(events)))

    async def _error(
        self, code: str, message: str, param: str | None, event_id: str | None
    ) -> None:
        body = error_body("invalid_request_error", code, message, param, event_id)
        await self._emit(self.event("error", error=body))

    # ---- client events --------------------------------------------------------------

    def take_nowait(self, text: str, budget: InputBudget | None = None) -> bool:
        """An ``input_audio_buffer.append`` under server VAD, handled without waiting (the
        server's direct receive path); False (nothing done) for anything else.

        This runs for every 20 ms of audio: the JSON parse and the base64 decode are all
        the protocol asks for (`parse_json`'s checks cannot fail on ``{type, audio}``
        alone once the audio has decoded: both strings are then ASCII)."""
        if self.state.manual or self._restoring is not None or _APPEND not in text:
            return False
        try:
            event = from_json(text, allow_inf_nan=False)
        except (ValueError, UnicodeError):
            return False  # the usual path reports it
        if type(event) is not dict or event.get("type") != "input_audio_buffer.append":
            return False
        audio = event.get("audio")
        if type(audio) is not str:
            return False
        try:
            if len(event) > 2:  # anything besides type and audio: the JSON limits apply
                check_json_value(event, self._json_limits)
            pcm = binascii.a2b_base64(audio, strict_mode=True)
        except (ProtocolError, binascii.Error, ValueError):
            return False  # the usual path reports it
        fmt = self.session.config.input_audio
        if fmt is not self._rate_of:  # changed by a session.update
            self._rate_of, self._rate = fmt, audio_bytes_per_second(fmt)
        if budget is not None and not budget.try_audio(len(pcm), self._rate):
            return False  # the usual path waits for the budget
        if not self.session.send_audio_nowait(pcm):
            if budget is not None:
                budget.refund_audio(len(pcm), self._rate)
            return False
        self._uncommitted = True
        return True

    async def receive_error(self, exc: DoorError, event_id: str | None = None) -> None:
        """Answer an event refused before it was parsed (e.g. too large)."""
        body = error_body(exc.type, exc.code, exc.message, exc.param, event_id)
        await self._emit(self.event("error", error=body))

    async def receive(self, raw: str | bytes) -> None:
        """Handle one client event; a bad one answers an ``error`` event, never raises."""
        event_id: str | None = None
        if self._restoring is not None:
            await asyncio.wait({self._restoring})
            self._restoring = None
        try:
            event = parse_json(raw, self._json_limits)
            if not isinstance(event, dict):
                raise DoorError("invalid_type", "an event must be a JSON object")
            raw_id = event.get("event_id")
            event_id = raw_id[:128] if isinstance(raw_id, str) else None
            kind = event.get("type")
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                shown = repr(kind[:64]) if isinstance(kind, str) else "missing"
                raise DoorError(
                    "invalid_value",
                    f"Invalid value: {shown}. Supported values are: "
                    + ", ".join(f"'{name}'" for name in self._handlers)
                    + ".",
                    "type",
                )
            await handler(event, event_id)
        except DoorError as exc:
            body = error_body(exc.type, exc.code, exc.message, exc.param, event_id)
            await self._emit(self.event("error", error=body))
        except ProtocolError as exc:
            if exc.fatal:
                await self.session.fail(exc.code, exc.message, id=event_id)
            else:
                body = duplex_error_body(exc.code, exc.message, event_id)
                if exc.message.startswith("invalid JSON"):
                    body["code"] = "invalid_json"
                await self._emit(self.event("error", error=body))

    async def _session_update(self, event: Event, event_id: str | None) -> None:
        state = self.state.updated(_field(event, "session", dict))
        await self.session.update(state.duplex_patch(), event_id)
        if state.input_format != self.state.input_format or state.manual != self.state.manual:
            self._buffer.clear()
        self.state = state
        await self._emit(self.event("session.updated", session=state.render(self.session.id)))

    async def _append(self, event: Event, event_id: str | None) -> None:
        audio = _b64(_field(event, "audio", str), "audio")
        if self.state.manual:
            self._buffer += audio
            cap = self._buffer_cap()
            if len(self._buffer) > cap:
                del self._buffer[: len(self._buffer) - cap]
        else:
            self._uncommitted = True
            await self.session.send_audio(audio, event_id)

    def _buffer_cap(self) -> int:
        """Bytes of input audio a manual turn keeps: ``max_turn_ms`` of it (the latest)."""
        config = self.session.config
        width = 2 if config.input_audio.format == "pcm16" else 1
        ms = config.turn_detection.max_turn_ms
        return config.input_audio.sample_rate * width * ms // 1000 // 2 * 2

    async def _commit(self, event: Event, event_id: str | None) -> None:
        if not self.state.manual:
            # Duplex ends the turn being spoken now (and answers it).
            await self.session.commit(None, event_id)
            return
        if not self._buffer:
            raise DoorError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: the buffer is empty.",
            )
        item_id = new_item_id()
        self._committed.append((item_id, bytes(self._buffer)))
        self._buffer.clear()
        # Commits without response.create keep at most one turn's audio (the latest).
        cap = self._buffer_cap()
        while len(self._committed) > 1 and sum(len(a) for _, a in self._committed) > cap:
            self._committed.pop(0)
        await self._emit(*self._user_audio_item(item_id))

    async def _clear(self, event: Event, event_id: str | None) -> None:
        self._buffer.clear()
        if not self.state.manual and self.state.model.mode == "vad":
            # Restart the detector: speech heard so far is dropped, as OpenAI's clear does.
            await self.session.update({"turn_detection": {"type": "manual"}}, event_id)
            await self.session.update(self.state.duplex_patch(), event_id)
            self._speech_item = None
        await self._emit(self.event("input_audio_buffer.cleared"))

    async def _item_create(self, event: Event, event_id: str | None) -> None:
        item = dict(_field(event, "item", dict))
        item_id = item.get("id") or new_item_id()
        if not isinstance(item_id, str) or len(item_id) > 64:
            raise DoorError("invalid_value", "item.id must be a string of at most 64", "item.id")
        if item_id in self._items:
            raise DoorError(
                "invalid_value", f"an item with id {item_id!r} already exists", "item.id"
            )
        kind = item.get("type", "message")
        if kind == "message":
            await self._message_item(item, event_id)
        elif kind == "function_call_output":
            call_id = _field(item, "call_id", str, "item.call_id")
            output = _field(item, "output", str, "item.output")
            self._outputs[call_id[:256]] = output
            while len(self._outputs) > MAX_OUTPUTS:
                del self._outputs[next(iter(self._outputs))]
            item = {"type": "function_call_output", "call_id": call_id, "output": output}
        else:
            raise DoorError(
                "invalid_value",
                f"item.type {str(kind)[:64]!r} cannot be created here "
                "(message or function_call_output)",
                "item.type",
            )
        item |= {"id": item_id, "object": "realtime.item", "status": "completed"}
        entry = _Item(item)
        if kind == "message" and item["role"] == "user":
            self._pending_user_items.append(item_id)
            del self._pending_user_items[:-MAX_ITEMS]
        await self._emit(*self._add_item(entry))

    async def _message_item(self, item: Event, event_id: str | None) -> None:
        role = item.get("role")
        if role not in ("user", "system", "assistant"):
            raise DoorError("invalid_value", "role must be user, system or assistant", "item.role")
        content = _field(item, "content", list, "item.content")
        texts: list[str] = []
        images: list[ImageFrame] = []
        clips: list[bytes] = []
        kept: list[Event] = []
        for i, part in enumerate(content):
            param = f"item.content[{i}]"
            if not isinstance(part, dict):
                raise DoorError("invalid_type", "a content part must be an object", param)
            ptype = part.get("type")
            if ptype in ("input_text", "text", "output_text"):
                texts.append(_field(part, "text", str, f"{param}.text"))
                kept.append({"type": ptype, "text": texts[-1]})
            elif ptype == "input_image" and role == "user":
                images.append(_image(_field(part, "image_url", str, f"{param}.image_url"), param))
                kept.append({"type": "input_image", "detail": part.get("detail", "auto")})
            elif ptype == "input_audio" and role == "user":
                clip = _b64(_field(part, "audio", str, f"{param}.audio"), f"{param}.audio")
                if not clip:
                    raise DoorError("invalid_value", "the audio is empty", f"{param}.audio")
                clips.append(clip)
                transcript = part.get("transcript")
                kept.append(
                    {
                        "type": "input_audio",
                        "transcript": transcript if isinstance(transcript, str) else None,
                    }
                )
            else:
                raise DoorError(
                    "invalid_value", f"content type {str(ptype)[:64]!r} not allowed here", param
                )
        if clips and self.state.model.mode != "vad":
            raise DoorError(
                "unsupported_value",
                "input_audio items are not supported with a realtime provider: "
                "use input_audio_buffer.append and commit",
                "item.content",
            )
        if role == "user":
            # Images first: a bad one fails the whole item before its text is taken.
            for frame in images:
                await self.session.send_frame(frame, event_id)
            for clip in clips:  # the user's next turn starts with them
                await self.session.send_audio_clip(clip, event_id)
            text = " ".join(texts)
            if text:
                await self.session.send_text(TextChunk(text, final=False), event_id)
        else:
            await self.session.store.append_messages(
                self.session.id,
                [Message(role=role, content=" ".join(texts), metadata={"source": "realtime"})],
            )
        item["content"] = kept
        item["role"] = role
        item["type"] = "message"

    async def _item_retrieve(self, event: Event, event_id: str | None) -> None:
        entry = self._find_item(event)
        await self._emit(self.event("conversation.item.retrieved", item=entry.item))

    async def _item_delete(self, event: Event, event_id: str | None) -> None:
        entry = self._find_item(event)
        item_id = entry.item["id"]
        del self._items[item_id]
        if entry.turn_id is not None or entry.response_id is not None:
            turn_id, response_id = entry.turn_id, entry.response_id
            role = entry.item.get("role")

            def match(m: Message) -> bool:
                if role == "user" and turn_id is not None:
                    return m.role == "user" and m.metadata.get("turn_id") == turn_id
                return m.role == "assistant" and m.metadata.get("response_id") == response_id

            self.session.spawn(
                self._history_edit(
                    history.delete_messages(self.session.store, self.session.id, match), event_id
                ),
                "realtime-delete",
            )
        await self._emit(self.event("conversation.item.deleted", item_id=item_id))

    async def _item_truncate(self, event: Event, event_id: str | None) -> None:
        entry = self._find_item(event)
        if entry.item.get("role") != "assistant" or entry.response_id is None:
            raise DoorError(
                "invalid_value", "only an assistant message with audio can be truncated", "item_id"
            )
        end_ms = event.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int | float) or end_ms < 0:
            raise DoorError("invalid_value", "audio_end_ms must be a number >= 0", "audio_end_ms")
        if end_ms > entry.audio_ms + 1:
            raise DoorError(
                "invalid_value",
                f"audio_end_ms {end_ms} is past the item's audio ({entry.audio_ms:.0f} ms)",
                "audio_end_ms",
            )
        response_id = entry.response_id
        # While the answer is being stored, the session cuts it itself ...
        await self.session.handle(
            Playback(type="playback", response_id=response_id, played_ms=float(end_ms))
        )
        # ... and once it is stored, the stored answer is cut.
        self.session.spawn(
            self._history_edit(
                history.truncate_answer(
                    self.session.store, self.session.id, response_id, float(end_ms)
                ),
                event_id,
            ),
            "realtime-truncate",
        )
        for part in entry.item.get("content", []):
            if part.get("transcript"):
                part["transcript"] = history.cut_text(
                    part["transcript"], float(end_ms), entry.audio_ms
                )
        await self._emit(
            self.event(
                "conversation.item.truncated",
                item_id=entry.item["id"],
                content_index=event.get("content_index", 0),
                audio_end_ms=int(end_ms),
            )
        )

    async def _history_edit(self, edit: Awaitable[bool], event_id: str | None) -> None:
        try:
            stored = await edit
        except (StoreUnavailable, TimeoutError) as exc:
            await self._error(
                "store_unavailable",
                f"the stored history could not be edited ({exc}); it is unchanged",
                "item_id",
                event_id,
            )
            return
        if not stored:
            await self._error(
                "item_not_stored",
                "the item was not stored in time; the stored history is unchanged",
                "item_id",
                event_id,
            )

    def _find_item(self, event: Event) -> _Item:
        item_id = _field(event, "item_id", str)
        entry = self._items.get(item_id)
        if entry is None:
            raise DoorError(
                "item_not_found", f"Item with item_id not found: {item_id[:64]}", "item_id"
            )
        return entry

    async def _response_create(self, event: Event, event_id: str | None) -> None:
        options = event.get("response") or {}
        if not isinstance(options, dict):
            raise DoorError("invalid_type", "`response` must be an object", "response")
        if self._response is not None or self._requested or self._requested_turns:
            active = self._response.id if self._response is not None else "(starting)"
            raise DoorError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {active}",
            )
        conversation = options.get("conversation") or "auto"
        if conversation not in ("auto", "none"):
            raise DoorError(
                "invalid_value",
                "response.conversation must be auto or none",
                "response.conversation",
            )
        options["conversation"] = conversation
        options["metadata"] = _metadata(options.get("metadata"))
        out_of_band = conversation == "none" or options.get("input") is not None
        oob_input = self._oob_input(options.get("input")) if out_of_band else None
        if out_of_band and (self.state.model.mode != "vad" or self._awaiting is not None):
            raise DoorError(
                "unsupported_value",
                "out-of-band responses (conversation: none, input) are not supported "
                + (
                    "with a realtime provider"
                    if self.state.model.mode != "vad"
                    else "while function calls wait for their outputs"
                ),
                "response.conversation",
            )
        modalities = options.get("output_modalities") or options.get("modalities")
        if modalities is not None:
            options["output_modalities"] = parse_modalities(
                modalities, "response.output_modalities"
            )
        instructions = options.get("instructions")
        if instructions is not None:
            if not isinstance(instructions, str):
                raise DoorError(
                    "invalid_type",
                    "response.instructions must be a string",
                    "response.instructions",
                )
            await self.session.update({"instructions": instructions}, event_id)
            options["restore_instructions"] = True
        if oob_input is not None:
            text, context = oob_input
            turn_id = await self.session.respond(text, context, store_answer=conversation == "auto")
            self._requested_turns[turn_id] = options
            return
        if self._awaiting is not None:
            await self._resume_after_tools(options, event_id)
            return
        self._requested.append(options)
        try:
            if self._committed:
                audio = b"".join(pcm for _, pcm in self._committed)
                self._commit_items.append(self._committed[-1][0])
                self._committed.clear()
                await self.session.send_audio(audio, event_id)
                await self.session.commit(None, event_id)
            elif self._pending_user_items or self.state.model.mode == "vad":
                # Whatever the conversation holds now (text items, images) is the turn
                # (in VAD mode an empty one: the model answers the history as it is).
                await self.session.send_text(TextChunk("", final=True), event_id)
            else:
                await self.session.commit(None, event_id)  # a realtime provider answers
        except BaseException:
            self._requested.pop()
            raise

    def _oob_input(self, items: Any) -> tuple[str, list[Message] | None]:
        """An out-of-band response's ``input`` -> (the turn's text, its context): the last
        user message is the turn, the items before it the history (None: no ``input``,
        the stored history). Text only: item references, and messages of text (or audio
        with a transcript)."""
        if items is None:
            return "", None
        if not isinstance(items, list):
            raise DoorError("invalid_type", "response.input must be an array", "response.input")
        messages: list[Message] = []
        for i, item in enumerate(items):
            param = f"response.input[{i}]"
            if not isinstance(item, dict):
                raise DoorError("invalid_type", "an input item must be an object", param)
            if item.get("type") == "item_reference":
                ref_id = item.get("id")
                ref = self._items.get(ref_id) if isinstance(ref_id, str) else None
                if ref is None:
                    raise DoorError("item_not_found", "no item with this id", f"{param}.id")
                item, literal = ref.item, False
            else:
                literal = True
            role = item.get("role")
            if item.get("type", "message") != "message" or role not in (
                "user",
                "system",
                "assistant",
            ):
                raise DoorError(
                    "unsupported_value",
                    "response.input takes messages and item references",
                    param,
                )
            texts: list[str] = []
            for j, part in enumerate(item.get("content") or []):
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(part, dict) and part.get("type") not in _TEXT_PARTS:
                    text = part.get("transcript")
                if isinstance(text, str):
                    texts.append(text)
                elif literal:
                    raise DoorError(
                        "unsupported_value",
                        "response.input takes text content (audio with a transcript)",
                        f"{param}.content[{j}]",
                    )
            messages.append(Message(role=role, content=" ".join(texts)))
        text = messages.pop().content if messages and messages[-1].role == "user" else ""
        return text, messages

    async def _resume_after_tools(self, options: dict[str, Any], event_id: str | None) -> None:
        duplex_id = self._awaiting
        assert duplex_id is not None
        calls, self._awaiting, self._awaiting_calls = self._awaiting_calls, None, []
        response = self._open_response(
            f"{duplex_id}_{next(self._continuations)}", duplex_id, options
        )
        await self._emit(self._response_created(response))
        for call_id in calls:
            output = self._outputs.pop(call_id, None)
            if output is None:
                output = '{"error": "the client gave no output for this call"}'
            await self.session.handle(
                ToolResult(type="tool.result", call_id=call_id, output=output, id=event_id)
            )

    async def _response_cancel(self, event: Event, event_id: str | None) -> None:
        response = self._response
        if response is None:
            raise DoorError(
                "response_cancel_not_active", "Cancellation failed: no active response found"
            )
        await self.session.cancel(event_id)

    async def _output_clear(self, event: Event, event_id: str | None) -> None:
        raise DoorError(
            "unsupported_event",
            "output_audio_buffer.clear is for WebRTC and SIP connections; over WebSocket the "
            "client owns playback (use response.cancel and conversation.item.truncate)",
            "type",
        )

    # ---- session messages -> server events --------------------------------------------

    def translate(self, message: BaseModel) -> list[Event]:
        """The Realtime server events one session message becomes (often none or one)."""
        match message:
            case DoorEvent():
                return message.events
            case ChunkEvent():
                return self._chunk(message)
            case ResponseStarted():
                return self._response_started(message)
            case ResponseDone():
                return self._response_done(message)
            case SpeechStarted():
                if self.state.manual:
                    return []
                self._speech_item = new_item_id()
                return [
                    self.event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=int(message.audio_start_ms),
                        item_id=self._speech_item,
                    )
                ]
            case SpeechStopped():
                if self.state.manual:
                    return []
                self._speech_item = self._speech_item or new_item_id()
                return [
                    self.event(
                        "input_audio_buffer.speech_stopped",
                        audio_end_ms=int(message.audio_end_ms),
                        item_id=self._speech_item,
                    )
                ]
            case TurnEnded():
                return self._turn_ended(message)
            case Transcript():
                return self._transcript(message)
            case SessionCreated():
                return [self.event("session.created", session=self.state.render(self.session.id))]
            case ErrorEvent():
                return [
                    self.event(
                        "error", error=duplex_error_body(message.code, message.message, message.id)
                    )
                ]
        # session.updated (the bridge answers session.update itself), tool execution
        # events of server tools, warnings, pongs: no Realtime counterpart.
        return []

    def _turn_ended(self, message: TurnEnded) -> list[Event]:
        events: list[Event] = []
        items = self._pending_user_items
        self._pending_user_items = []
        spoken = message.audio_end_ms is not None
        if spoken:
            if self.state.manual and self._commit_items:
                item_id = self._commit_items.popleft()
            else:
                item_id = self._speech_item or new_item_id()
                events = self._user_audio_item(item_id)
            self._speech_item = None
            self._uncommitted = False
            self._last_audio_item = item_id
            items.append(item_id)
        if spoken and self.state.holds_turns and not self.state.manual:
            # Held by the session until response.create: the turn that answers it takes
            # these items.
            self._held_items += items
            del self._held_items[:-MAX_ITEMS]
            return events
        items = self._held_items + items
        self._held_items = []
        for item_id in items:
            entry = self._items.get(item_id)
            if entry is not None:
                entry.turn_id = message.turn_id
        if items:
            # The turn's transcript belongs to its (last) audio item.
            audio = [i for i in items if self._has_audio(i)]
            self._turn_items[message.turn_id] = (audio or items)[-1]
            while len(self._turn_items) > MAX_TURNS:
                self._turn_items.popitem(last=False)
        return events

    def _has_audio(self, item_id: str) -> bool:
        entry = self._items.get(item_id)
        return entry is not None and any(
            part.get("type") == "input_audio" for part in entry.item.get("content", [])
        )

    def _user_audio_item(self, item_id: str) -> list[Event]:
        previous = self._last_item
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        return [
            self.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id),
            *self._add_item(_Item(item)),
        ]

    def _add_item(self, entry: _Item) -> list[Event]:
        previous = self._last_item
        item_id = entry.item["id"]
        self._items[item_id] = entry
        while len(self._items) > MAX_ITEMS:
            self._items.popitem(last=False)
        self._last_item = item_id
        return [
            self.event("conversation.item.added", previous_item_id=previous, item=entry.item),
            self.event("conversation.item.done", previous_item_id=previous, item=entry.item),
        ]

    def _transcript(self, message: Transcript) -> list[Event]:
        events: list[Event] = []
        if message.turn_id is None:  # a realtime provider's transcript
            events = self._provider_turn()
            item_id = self._last_audio_item
        else:
            item_id = self._turn_items.get(message.turn_id)
        if item_id is None:
            return events
        if not message.final:
            # Partial transcripts carry the text so far: the delta is what is new.
            text, previous = message.text, self._partial
            self._partial = text
            delta = text[len(previous) :] if text.startswith(previous) else text
            if not delta:
                return events
            return [
                *events,
                self.event(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=item_id,
                    content_index=0,
                    delta=delta,
                ),
            ]
        self._partial = ""
        entry = self._items.get(item_id)
        if entry is not None:
            for part in entry.item.get("content", []):
                if part.get("type") == "input_audio":
                    part["transcript"] = message.text
        return [
            *events,
            self.event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=message.text,
                usage={"type": "duration", "seconds": 0},
            ),
        ]

    # ---- responses --------------------------------------------------------------------

    def _open_response(self, id: str, duplex_id: str, options: dict[str, Any]) -> _Response:
        response = self._response = _Response(
            id=id,
            duplex_id=duplex_id,
            modalities=options.get("output_modalities") or list(self.state.output_modalities),
            restore_instructions=bool(options.get("restore_instructions")),
            conversation=options.get("conversation") or "auto",
            metadata=options.get("metadata"),
        )
        return response

    def _response_object(self, response: _Response, status: str, **extra: Any) -> Event:
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": None,
            "output": response.output,
            "conversation_id": self._conversation_id if response.in_conversation else None,
            "output_modalities": response.modalities,
            "max_output_tokens": self.state.max_output_tokens,
            "audio": {
                "output": {
                    "format": format_object(self.state.output_format),
                    "voice": self.state.voice,
                }
            },
            "usage": None,
            "metadata": response.metadata,
        } | extra

    def _response_created(self, response: _Response) -> Event:
        return self.event(
            "response.created", response=self._response_object(response, "in_progress")
        )

    def _response_started(self, message: ResponseStarted) -> list[Event]:
        options = self._requested_turns.pop(message.turn_id or "", None)
        if options is None:
            options = self._requested.popleft() if self._requested else {}
        events = self._provider_turn()
        response = self._open_response(message.response_id, message.response_id, options)
        return [*events, self._response_created(response)]

    def _provider_turn(self) -> list[Event]:
        """A realtime provider found the turn itself without a turn event of ours: the
        audio it heard becomes the user's item when it transcribes it or answers."""
        if not (self._uncommitted and self.state.model.mode == "asm"):
            return []
        item_id = self._speech_item or new_item_id()
        self._speech_item, self._uncommitted = None, False
        self._last_audio_item = item_id
        self._partial = ""
        return self._user_audio_item(item_id)

    def _current(self, duplex_id: str) -> _Response | None:
        response = self._response
        if response is not None and response.duplex_id == duplex_id:
            return response
        return None

    def _chunk(self, chunk: ChunkEvent) -> list[Event]:
        response = self._current(chunk.response_id)
        if response is None:
            return []
        events: list[Event] = []
        if chunk.delta:
            events += self._open_message(response)
            message = response.message
            assert message is not None
            response.text.append(chunk.delta)
            kind = (
                "response.output_audio_transcript.delta"
                if response.audio
                else "response.output_text.delta"
            )
            events.append(self._part_event(kind, response, delta=chunk.delta))
        media = chunk.media
        if media is not None and response.audio and media.mime_type == "audio/pcm":
            events += self._open_message(response)
            message = response.message
            assert message is not None
            rate = media.sample_rate or 24000
            message.audio_ms += len(media.data) / 2 / rate * 1000
            data = media.data
            law = _G711.get(self.state.output_format)
            if law is not None:
                data = g711.encode(data, law)
            events.append(
                self._part_event(
                    "response.output_audio.delta",
                    response,
                    delta=base64.b64encode(data).decode("ascii"),
                )
            )
        if chunk.tool_calls:
            events += self._close_message(response, "completed")
            for call in chunk.tool_calls:
                events += self._function_call(response, call.id, call.name, call.arguments)
            # The session waits for the outputs; the Realtime response ends here, and the
            # next one starts at the client's response.create.
            self._awaiting = response.duplex_id
            self._awaiting_calls = [call.id for call in chunk.tool_calls]
            events += self._finish(response, "completed", None, None)
        return events

    def _part_event(self, kind: str, response: _Response, **fields: Any) -> Event:
        message = response.message
        assert message is not None
        return self.event(
            kind,
            response_id=response.id,
            item_id=message.item["id"],
            output_index=len(response.output) - 1,
            content_index=0,
            **fields,
        )

    def _open_message(self, response: _Response) -> list[Event]:
        if response.message is not None:
            return []
        item = {
            "id": new_item_id(),
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        entry = response.message = _Item(item, response_id=response.duplex_id)
        response.text = []
        response.output.append(item)
        part = (
            {"type": "audio", "transcript": ""} if response.audio else {"type": "text", "text": ""}
        )
        return [
            self.event(
                "response.output_item.added",
                response_id=response.id,
                output_index=len(response.output) - 1,
                item=item,
            ),
            *self._conversation_added(response, entry),
            self._part_event("response.content_part.added", response, part=part),
        ]

    def _conversation_added(self, response: _Response, entry: _Item) -> list[Event]:
        """A response's output item joins the conversation (not out of band)."""
        if not response.in_conversation:
            return []
        previous = self._last_item
        self._items[entry.item["id"]] = entry
        self._last_item = entry.item["id"]
        return [
            self.event("conversation.item.added", previous_item_id=previous, item=dict(entry.item))
        ]

    def _close_message(self, response: _Response, status: str) -> list[Event]:
        entry = response.message
        if entry is None:
            return []
        text = "".join(response.text)
        events: list[Event] = []
        if response.audio:
            part = {"type": "audio", "transcript": text}
            events.append(self._part_event("response.output_audio.done", response))
            events.append(
                self._part_event("response.output_audio_transcript.done", response, transcript=text)
            )
            content = {"type": "output_audio", "transcript": text}
        else:
            part = {"type": "text", "text": text}
            events.append(self._part_event("response.output_text.done", response, text=text))
            content = {"type": "output_text", "text": text}
        events.append(self._part_event("response.content_part.done", response, part=part))
        entry.item["content"] = [content]
        entry.item["status"] = status
        events.append(
            self.event(
                "response.output_item.done",
                response_id=response.id,
                output_index=len(response.output) - 1,
                item=entry.item,
            )
        )
        if response.in_conversation:
            events.append(self.event("conversation.item.done", item=entry.item))
        response.message = None
        response.text = []
        return events

    def _function_call(
        self, response: _Response, call_id: str, name: str, arguments: str
    ) -> list[Event]:
        item = {
            "id": new_item_id(),
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "call_id": call_id,
            "name": name,
            "arguments": "",
        }
        response.output.append(item)
        index = len(response.output) - 1
        common = {"response_id": response.id, "item_id": item["id"], "output_index": index}
        events = [
            self.event(
                "response.output_item.added",
                response_id=response.id,
                output_index=index,
                item=dict(item),
            ),
            *self._conversation_added(response, _Item(item, response_id=response.duplex_id)),
            self.event(
                "response.function_call_arguments.delta",
                call_id=call_id,
                delta=arguments,
                **common,
            ),
            self.event(
                "response.function_call_arguments.done",
                call_id=call_id,
                name=name,
                arguments=arguments,
                **common,
            ),
        ]
        item["arguments"] = arguments
        item["status"] = "completed"
        events.append(
            self.event(
                "response.output_item.done", response_id=response.id, output_index=index, item=item
            )
        )
        if response.in_conversation:
            events.append(self.event("conversation.item.done", item=item))
        return events

    def _response_done(self, message: ResponseDone) -> list[Event]:
        response = self._current(message.response_id)
        if response is None:
            if self._awaiting == message.response_id:  # ended while waiting for outputs
                self._awaiting, self._awaiting_calls = None, []
            return []
        status, details = _STATUS.get(
            message.finish_reason,
            (
                "failed",
                {"type": "failed", "error": {"type": "server_error", "code": "provider_failed"}},
            ),
        )
        events = self._close_message(
            response, "completed" if status == "completed" else "incomplete"
        )
        return events + self._finish(response, status, details, message.usage)

    def _finish(
        self,
        response: _Response,
        status: str,
        details: dict[str, Any] | None,
        usage: dict[str, Any] | None,
    ) -> list[Event]:
        self._response = None
        if response.restore_instructions:
            self._restoring = self.session.spawn(
                self._restore_instructions(), "realtime-instructions"
            )
        body = self._response_object(response, status, status_details=details, usage=_usage(usage))
        return [self.event("response.done", response=body)]

    async def _restore_instructions(self) -> None:
        try:
            await self.session.update({"instructions": self.state.instructions})
        except ProtocolError as exc:
            await self._emit(
                self.event("error", error=duplex_error_body(exc.code, exc.message, None))
            )


def _metadata(value: Any) -> dict[str, str] | None:
    count, key_chars, value_chars = MAX_METADATA
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > count
        or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and len(k) <= key_chars
            and len(v) <= value_chars
            for k, v in value.items()
        )
    ):
        raise DoorError(
            "invalid_value",
            f"response.metadata must map at most {count} keys of {key_chars} characters "
            f"to strings of {value_chars}",
            "response.metadata",
        )
    return dict(value)


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    inp = usage.get("input_tokens", usage.get("prompt_tokens"))
    out = usage.get("output_tokens", usage.get("completion_tokens"))
    total = usage.get("total_tokens")
    if total is None and isinstance(inp, int) and isinstance(out, int):
        total = inp + out
    return {"total_tokens": total, "input_tokens": inp, "output_tokens": out}


def _field(event: Event, key: str, kind: type, param: str | None = None) -> Any:
    value = event.get(key)
    if value is None:
        raise DoorError(
            "missing_required_parameter",
            f"Missing required parameter: '{param or key}'.",
            param or key,
        )
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {str: "a string", dict: "an object", list: "an array"}
        raise DoorError(
            "invalid_type",
            f"`{param or key}` must be {names.get(kind, kind.__name__)}",
            param or key,
        )
    return value


def _b64(text: str, param: str) -> bytes:
    try:
        return binascii.a2b_base64(text, strict_mode=True)  # = b64decode(validate=True)
    except (binascii.Error, ValueError):
        raise DoorError("invalid_value", f"`{param}` is not valid base64", param) from None


def _image(url: str, param: str) -> ImageFrame:
    """An ``input_image``'s data URL -> an image frame (checked by the session like
    ``input.image``). Remote URLs are not fetched."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise DoorError(
            "invalid_value",
            "image_url must be a base64 data URL (data:image/...;base64,...)",
            f"{param}.image_url",
        )
    mime = head[len("data:") : -len(";base64")] or "application/octet-stream"
    return ImageFrame(_b64(data, f"{param}.image_url"), mime[:128])
