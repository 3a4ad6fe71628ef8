"""Images and video from the client -> JPEG ImageFrames for providers, under the rate policy.

Decoding runs in worker threads (PyAV releases the GIL), so one session's
camera never stalls another session's audio.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from duplex.protocol import RATE_LIMITED, ImageFrame, ProtocolError, VideoChunk, VideoConfig
from media.errors import MediaError
from media.image import ImageLimits, image_pixels, prepare_image
from media.mp4file import MAX_FILE_FRAMES
from media.video import FramePolicy, VideoPushResult, VideoStream
from server.decode_budget import PixelBudget

_T = TypeVar("_T")

#: Frames kept for the turn being collected (the newest win).
MAX_PENDING_FRAMES = MAX_FILE_FRAMES
#: Video streams one session may have open at once (one decoder each).
MAX_VIDEO_STREAMS = 2


class Notify(Protocol):
    """Reports a non-fatal problem with the client's video (an ``error`` message)."""

    def __call__(self, code: int, message: str, *, id: str | None = None) -> Awaitable[None]: ...


class FrameSource:
    """Per session: validates and scales images, decodes video, applies the sampling
    policy, and either collects frames for the next turn (VAD mode) or hands each
    one on at once (``forward``, ASM mode).

    ``video`` is the session's ``config.video`` (`reconfigure` takes a new one);
    ``max_pixels`` bounds decoded images; ``notify`` reports decoder notices.
    """

    def __init__(
        self,
        video: VideoConfig,
        max_pixels: int,
        notify: Notify,
        forward: Callable[[ImageFrame], Awaitable[None]] | None = None,
        *,
        budget: PixelBudget | None = None,
        decode_wait_s: float = 10.0,
    ) -> None:
        self.max_pixels = max_pixels
        #: The app's decode budget (server/decode_budget.py); None: this source's own.
        self.budget = budget if budget is not None else PixelBudget(max_pixels)
        self.decode_wait_s = decode_wait_s
        self.notify = notify
        self.forward = forward
        self.pending: deque[ImageFrame] = deque(maxlen=MAX_PENDING_FRAMES)
        self.last: ImageFrame | None = None
        self._streams: dict[str, VideoStream] = {}
        self._last_accepted = -1e18
        self.reconfigure(video)

    def _now_ms(self) -> float:
        return time.monotonic() * 1000

    def reconfigure(self, video: VideoConfig) -> None:
        self.limits = ImageLimits(max_dimension=video.max_dimension, max_pixels=self.max_pixels)
        self.policy = FramePolicy(fps_speaking=video.fps_speaking, fps_idle=video.fps_idle)
        for stream in self._streams.values():
            stream.policy = self.policy
            stream.limits = self.limits

    async def add_image(self, frame: ImageFrame, *, speaking: bool) -> None:
        pixels = image_pixels(frame.data)
        if pixels > self.limits.max_pixels:
            pixels = 0  # refused from its header, never decoded
        held = await self._wait_for_budget(pixels, "image")
        try:
            prepared = await self._decode(
                held,
                prepare_image,
                frame.data,
                frame.mime_type,
                self.limits,
                frame.width,
                frame.height,
            )
        except MediaError as exc:
            raise ProtocolError(exc.code, exc.message) from None
        out = ImageFrame(
            prepared.data,
            prepared.mime_type,
            prepared.width,
            prepared.height,
            frame.frame_num,
            frame.timestamp,
        )
        await self._accept(out, speaking)

    async def _wait_for_budget(self, pixels: int, what: str) -> int:
        """Wait (bounded) for the app's decode budget to hold ``pixels``; 429 after."""
        try:
            async with asyncio.timeout(self.decode_wait_s):
                return await self.budget.acquire(pixels)
        except TimeoutError:
            raise ProtocolError(
                RATE_LIMITED,
                f"the server is busy decoding images and video; this {what} was dropped, "
                "send it again later",
            ) from None

    async def _decode(self, held: int, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn`` in a worker thread, holding ``held`` pixels of the budget until it ends.

        Released when the thread ends, not when this task does: a cancelled wait leaves
        the thread decoding, and its pixels still count."""
        budget = self.budget
        decode = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        decode.add_done_callback(lambda done: _released(done, budget, held))
        return await asyncio.shield(decode)

    async def add_video(self, chunk: VideoChunk, *, speaking: bool, msg_id: str | None) -> None:
        stream = self._streams.get(chunk.mime_type)
        if stream is None:
            if len(self._streams) >= MAX_VIDEO_STREAMS:
                raise ProtocolError(415, f"at most {MAX_VIDEO_STREAMS} video streams per session")
            try:
                stream = VideoStream(chunk.mime_type, self.policy, self.limits)
            except MediaError as exc:
                raise ProtocolError(exc.code, exc.message) from None
            self._streams[chunk.mime_type] = stream
        held = await self._wait_for_budget(
            stream.decode_pixels(chunk.width, chunk.height), "video chunk"
        )
        result = await self._decode(
            held,
            stream.push,
            chunk.chunk_index,
            chunk.data,
            now_ms=self._now_ms(),
            speaking=speaking,
            timestamp_ms=chunk.timestamp,
            width=chunk.width,
            height=chunk.height,
            final=chunk.final,
        )
        await self._take_result(result, msg_id)

    async def poll(self, *, speaking: bool) -> None:
        """Collect frames that came due since the last chunk (called at a turn's end).

        The session may close while a stream decodes in its thread (`close` clears the
        streams): a stream no longer held is neither polled nor heard from.
        """
        for mime_type, stream in list(self._streams.items()):
            if self._streams.get(mime_type) is not stream:
                continue
            try:
                held = await self._wait_for_budget(stream.decode_pixels(), "video")
            except ProtocolError:
                continue  # the turn goes on without this stream's due frame
            result = await self._decode(held, stream.poll, now_ms=self._now_ms(), speaking=speaking)
            if self._streams.get(mime_type) is stream:
                await self._take_result(result, None)

    async def _take_result(self, result: VideoPushResult, msg_id: str | None) -> None:
        for out in result.frames:
            frame = ImageFrame(
                out.data, "image/jpeg", out.width, out.height, out.chunk_index, out.timestamp_ms
            )
            await self._deliver(frame)
        for notice in result.notices:
            await self.notify(notice.code, notice.message, id=msg_id)

    async def _accept(self, frame: ImageFrame, speaking: bool) -> None:
        """Images pass at most at the policy's rate; within an interval the newest wins."""
        fps = self.policy.fps_speaking if speaking else self.policy.fps_idle
        now = self._now_ms()
        if fps > 0 and now - self._last_accepted >= 1000 / fps:
            self._last_accepted = now
            await self._deliver(frame)
        elif self.forward is None and self.pending:
            self.pending[-1] = frame
            self.last = frame
        elif self.forward is None:
            await self._deliver(frame)

    async def _deliver(self, frame: ImageFrame) -> None:
        self.last = frame
        if self.forward is not None:
            await self.forward(frame)
        else:
            self.pending.append(frame)

    @property
    def has_video(self) -> bool:
        """Whether a video stream is open (its due frames are collected at a turn's end)."""
        return bool(self._streams)

    def take(self) -> list[ImageFrame]:
        """The frames of the turn just ended; the last earlier frame when none came in it."""
        frames = list(self.pending)
        self.pending.clear()
        if not frames and self.last is not None:
            frames = [self.last]
        return frames

    def close(self) -> None:
        self._streams.clear()
        self.pending.clear()


def _released(decode: asyncio.Future[object], budget: PixelBudget, pixels: int) -> None:
    budget.release(pixels)
    if not decode.cancelled():
        decode.exception()  # retrieved: a caller that was cancelled no longer looks
