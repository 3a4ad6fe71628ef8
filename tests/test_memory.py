"""Memory is bounded per session and returned at close (no cycles left for a rare full GC)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import TOKEN
from tests.speech import make_conversation
from tests.wsutil import connect

SILENCE_1S = np.zeros(16000, dtype=np.int16)


@pytest.fixture(scope="module")
def speech() -> bytes:
    conv = make_conversation(seed=11, n_turns=1, voices=["en"], speeds=[160])
    return np.concatenate([conv.audio, SILENCE_1S]).astype("<i2").tobytes()


async def _until_removed(registry, tenant: str, session_id: str) -> None:
    for _ in range(1000):  # at most 10 s
        if registry.get(tenant, session_id) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session was not removed after its connection closed")


@pytest.mark.parametrize("leave", ["close", "drop"])
async def test_closed_session_is_freed_by_reference_counting(server_factory, speech, leave):
    """A session that streamed audio, got a spoken reply and closed (at once on the
    client's close 1000, or after its resume grace when the socket drops) leaves nothing
    alive, with the cyclic GC off: the server freezes the heap and runs full collections
    rarely, so anything left in a cycle would wait there, native buffers included."""
    live_server = server_factory(resume_grace_s=0.2)
    registry = live_server.app.state.duplex.registry
    gc.collect()
    gc.disable()
    try:
        async with connect(live_server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            session = registry.get("tenant-a", session_id)
            refs = [weakref.ref(session), weakref.ref(session._mode)]
            refs.append(weakref.ref(session._mode._frames))
            del session
            for i in range(0, len(speech) - 640, 640):
                await c.send(speech[i : i + 640])
            await c.until("response.done", timeout=30)
            if leave == "drop":
                c.ws.transport.abort()  # no close frame: detached, then the grace ends
        await _until_removed(registry, "tenant-a", session_id)
        for _ in range(50):  # the close finishes in tasks of its own: give them turns
            if all(ref() is None for ref in refs):
                break
            await asyncio.sleep(0.02)
        alive = [type(ref()).__name__ for ref in refs if ref() is not None]
        assert alive == []
    finally:
        gc.enable()


async def test_session_ended_by_an_error_is_freed_too(live_server):
    """The fatal path (``fail`` closes in a task of its own) leaves no cycle either."""
    registry = live_server.app.state.duplex.registry
    gc.collect()
    gc.disable()
    try:
        async with connect(live_server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            session = registry.get("tenant-a", session_id)
            refs = [weakref.ref(session), weakref.ref(session._mode)]
            loop = next(iter(session._tasks)).get_loop()  # the server's, in its own thread
            asyncio.run_coroutine_threadsafe(session.fail(500, "test: fatal"), loop).result(5)
            del session, loop
            event = await c.recv()
            assert event["type"] == "error" and event["fatal"]
        await _until_removed(registry, "tenant-a", session_id)
        for _ in range(50):
            if all(ref() is None for ref in refs):
                break
            await asyncio.sleep(0.02)
        assert [type(ref()).__name__ for ref in refs if ref() is not None] == []
    finally:
        gc.enable()


# ---- per-session buffers ----------------------------------------------------------------


def _kept_bytes(td) -> int:
    return sum(map(len, [*td._blocks, *td._tail]))


def test_quiet_stream_keeps_little_audio_and_turns_are_unchanged(speech):
    """With `idle_history_ms=0` (the server's setting) a stream keeps about a second of
    audio while no turn is open, instead of `pre_roll_ms + max_turn_ms` (~1 MB at the
    defaults), and every event, time and turn's audio is what the unbounded detector
    gives, whatever the chunking."""
    from vad.detector import SpeechDetector
    from vad.turns import TurnConfig, TurnDetector

    quiet = np.zeros(16000 * 40, np.int16).tobytes()  # 40 s, longer than max_turn_ms
    speech = speech[: len(speech) // 640 * 640]
    stream = quiet[: 16000 * 2 * 3] + speech + quiet + speech + quiet[: 16000 * 2 * 2]
    reference = TurnDetector(TurnConfig(), SpeechDetector())
    want = reference.push_pcm(stream) + reference.flush()
    assert sum(type(e).__name__ == "TurnEnd" for e in want) == 2
    rng = np.random.default_rng(3)
    for sizes in ([640], [640 * 5], [640 * 50], list(rng.integers(1, 120, 50) * 640)):
        td = TurnDetector(TurnConfig(idle_history_ms=0), SpeechDetector())
        got, kept_quiet, pos, i = [], [], 0, 0
        while pos < len(stream):
            size = int(sizes[i % len(sizes)])
            got += td.push_pcm(stream[pos : pos + size])
            pos, i = pos + size, i + 1
            if td.state == "quiet":
                kept_quiet.append(_kept_bytes(td))
        assert got + td.flush() == want
        # The edges' history (0.6 s), a sealed block, the push and the block filling.
        assert max(kept_quiet) <= (500 + 1000 + 1000) * 32 + 2 * max(sizes)
    assert _kept_bytes(reference) >= 30 * 32000  # what the unbounded detector holds


def test_idle_history_is_what_turn_detection_needs(speech):
    """Between turns a session keeps the history the next turn's edges read before its
    onset (the edges' reach, 300 ms, and the pre-roll or noise reference before that,
    300 ms) and little more: at most 400 ms of block rounding and the block filling,
    plus the latest message. It kept 1-2 s (about 32 KB a session more) before. While a
    turn is open it keeps the turn and its pre-roll, to within a block (200 ms)."""
    from duplex.protocol import InputAudioConfig, TurnDetectionConfig
    from server.modes.audio_ingest import AudioIngest

    ingest = AudioIngest(InputAudioConfig(), TurnDetectionConfig())
    td = ingest.detector
    needed = (td._lookback + 16000 * 400 // 1000) * 2
    assert td._lookback == 16000 * 600 // 1000
    stream = bytes(16000 * 2 * 3) + speech[: len(speech) // 640 * 640] + bytes(16000 * 2 * 5)
    kept_quiet, turn_slack, started = [], [], None
    for i in range(0, len(stream), 640):
        ingest.events(stream[i : i + 640])
        if td.state == "quiet":
            kept_quiet.append(_kept_bytes(td))
            started = None
        elif td.state in ("speaking", "stopping"):
            # Once the turn has started its onset is refined: only the pre-roll before
            # it is ever read again (half a second of audio less for every open turn),
            # dropped as the next block is sealed.
            started = td._pos if started is None else started
            if td._pos - started >= td._seal:
                turn_slack.append(td._onset - td._pre - td._blocks_start)
    assert max(kept_quiet) <= needed + 640
    assert turn_slack and max(turn_slack) <= 16000 * 200 // 1000


def test_server_ingest_keeps_little_audio_between_turns():
    """What a VAD session holds for its audio after a minute of quiet input."""
    from duplex.protocol import InputAudioConfig, TurnDetectionConfig
    from server.modes.audio_ingest import AudioIngest

    ingest = AudioIngest(InputAudioConfig(), TurnDetectionConfig())
    silence = bytes(640)
    for _ in range(3000):  # 60 s in 20 ms messages
        ingest.events(silence)
    assert _kept_bytes(ingest.detector) <= 2 * 32000 + 640


# ---- image decodes ------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    import av

    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "rgb24"
    frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
    return b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None))


async def test_image_decodes_wait_for_the_pixel_budget(server_factory, monkeypatch):
    """Four sessions send a 3 Mpx PNG at once; the budget holds one and a half: the
    decodes run one at a time and all four are answered. Each decode waits (bounded) for
    a second one to start, so without the budget they would overlap."""
    import base64
    import threading

    import server.media_inputs as media_inputs
    from media.image import image_pixels

    width, height = 2000, 1500
    image = _png(width, height)
    budget = width * height * 3 // 2
    lock = threading.Lock()
    inside: list[int] = []
    most = [0]
    two_inside = threading.Event()
    real = media_inputs.prepare_image

    def prepare(data, *args, **kwargs):
        with lock:
            inside.append(image_pixels(data))
            most[0] = max(most[0], sum(inside))
            if len(inside) >= 2:
                two_inside.set()
        two_inside.wait(0.5)  # a safety bound, not a measurement
        try:
            return real(data, *args, **kwargs)
        finally:
            with lock:
                inside.remove(image_pixels(data))

    monkeypatch.setattr(media_inputs, "prepare_image", prepare)
    server = server_factory(max_decode_pixels=budget, max_image_pixels=budget)
    message = {
        "type": "input.image",
        "data": base64.b64encode(image).decode(),
        "mime_type": "image/png",
    }

    await _four_sessions_answer(server, message)
    assert 0 < most[0] <= budget


def _h264(width: int, height: int, frames: int = 4) -> bytes:
    import io

    import av

    out = io.BytesIO()
    with av.open(out, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": "15", "preset": "ultrafast", "tune": "zerolatency"}
        for i in range(frames):
            img = np.full((height, width, 3), i * 40, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


async def test_video_decodes_wait_for_the_pixel_budget(server_factory, monkeypatch):
    """Four sessions each send a 640x480 H.264 stream at once. A stream decoding holds
    `DECODE_PICTURES` pictures of its size; the budget holds one and a half such streams:
    the decodes run one at a time and every stream still gives its frame. Each decode
    waits (bounded) for a second one to start, so without the budget they would overlap."""
    import base64
    import threading

    from media.video import DECODE_PICTURES, VideoStream

    width, height = 640, 480
    video = _h264(width, height)
    held = DECODE_PICTURES * width * height
    budget = held * 3 // 2
    lock = threading.Lock()
    inside = [0]
    most = [0]
    two_inside = threading.Event()
    real = VideoStream.push

    def push(self, *args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0] * held)
            if inside[0] >= 2:
                two_inside.set()
        two_inside.wait(0.5)  # a safety bound, not a measurement
        try:
            return real(self, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(VideoStream, "push", push)
    server = server_factory(max_decode_pixels=budget, max_image_pixels=budget)
    message = {
        "type": "input.video",
        "data": base64.b64encode(video).decode(),
        "mime_type": "video/h264",
        "chunk_index": 0,
        "width": width,
        "height": height,
    }

    await _four_sessions_answer(server, message)
    assert 0 < most[0] <= budget


def test_a_video_stream_counts_the_pictures_it_decodes():
    """Before its first picture a stream counts the declared size (else the largest
    allowed); after, the size it decoded."""
    from media.image import ImageLimits
    from media.video import DECODE_PICTURES, FramePolicy, VideoStream

    stream = VideoStream("video/h264", FramePolicy(1, 1), ImageLimits(max_pixels=1_000_000))
    assert stream.decode_pixels() == DECODE_PICTURES * 1_000_000
    assert stream.decode_pixels(640, 480) == DECODE_PICTURES * 640 * 480
    stream.push(0, _h264(320, 240), now_ms=0, speaking=True)
    assert stream.decode_pixels(640, 480) == DECODE_PICTURES * 320 * 240


async def test_pixel_budget_waits_in_order_and_a_cancelled_wait_gives_up_its_place():
    from server.decode_budget import PixelBudget

    budget = PixelBudget(10)
    assert await budget.acquire(8) == 8
    big = asyncio.ensure_future(budget.acquire(6))
    small = asyncio.ensure_future(budget.acquire(1))  # fits, but must not overtake `big`
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    big.cancel()
    assert await asyncio.wait_for(small, 5) == 1  # granted once `big` left the queue
    assert budget.in_use == 9
    budget.release(8)
    budget.release(1)
    assert budget.in_use == 0
    assert await budget.acquire(100) == 10  # more than the budget waits for all of it


def test_mmap_threshold_is_pinned_on_glibc_unless_the_environment_chose(monkeypatch):
    import platform

    from server.allocator import fix_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False  # the operator's choice stands
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if platform.libc_ver()[0] == "glibc":
        assert fix_mmap_threshold() is True


@pytest.mark.parametrize("history_ms", [0, 5000])
async def test_vad_commit_with_no_turn_open_holds_the_configured_history(
    server_factory, history_ms
):
    """A steady tone is no speech: a commit then holds what the session kept between
    turns, 0.6-1 s by default, all of it with ``DUPLEX_VAD_IDLE_HISTORY_MS`` above it."""
    server = server_factory(vad_idle_history_ms=history_ms)
    t = np.arange(3 * 16000) / 16000
    tone = (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()
    async with connect(server, TOKEN) as c:
        await c.recv()
        for i in range(0, len(tone), 640):
            await c.send(tone[i : i + 640])
        await c.send({"type": "input.commit"})
        ended = (await c.until("turn.ended"))[-1]
    held = ended["audio_end_ms"] - ended["audio_start_ms"]
    if history_ms:
        assert held == pytest.approx(3000, abs=50)
    else:
        assert 500 <= held <= 2600


def test_a_large_push_resamples_exactly_like_small_ones():
    """A 2 s push (a file upload, ``--fast``) gives what 10 ms pushes give (the stream's
    memory whatever its chunks: tests/test_media_resample.py)."""
    from media.audio import StreamResampler

    rng = np.random.default_rng(5)
    pcm = (rng.standard_normal(48000 * 2) * 3000).astype(np.int16).tobytes()
    whole = StreamResampler(48000, 1, 16000, 1)
    one = whole.push_bytes(pcm) + whole.flush().tobytes()
    small = StreamResampler(48000, 1, 16000, 1)
    step = 2 * 480
    many = b"".join(small.push_bytes(pcm[i : i + step]) for i in range(0, len(pcm), step))
    assert one == many + small.flush().tobytes()


async def test_memory_store_lets_a_closed_sessions_outbox_go_after_its_age(monkeypatch):
    """The store's copy of a session's outbox is only read within `outbox_max_age_s`; a
    closed session's copy (~64 KB of JSON per second of reply audio) stayed until the
    session itself expired, a day later: 200 echo sessions a round added ~80 MB a round."""
    import time

    import server.state.memory as memory
    from server.state.base import OutboxBatch, OutboxEntry, SessionRecord

    now = [time.time()]
    monkeypatch.setattr(memory.time, "time", lambda: now[0])
    store = memory.MemoryStore()
    for sid in ("closed", "live"):
        await store.create_session(SessionRecord(id=sid, tenant="t"))
    reply = "x" * 6400
    await store.append_outbox(
        [OutboxBatch("closed", [OutboxEntry(k, reply, now[0]) for k in range(1, 50)])],
        max_age_s=60,
    )
    now[0] += 30
    await store.append_outbox([OutboxBatch("live", [OutboxEntry(1, reply, now[0])])], max_age_s=60)
    assert len(store._entries["closed"].outbox) == 49  # still within the age: kept
    now[0] += 31
    await store.get_session("live")  # any call
    assert len(store._entries["closed"].outbox) == 0
    assert len(store._entries["live"].outbox) == 1
    assert await store.load_outbox("live", max_age_s=60)


async def test_the_server_gives_freed_heap_back_periodically(monkeypatch):
    """The trimmer calls glibc's malloc_trim every interval until cancelled."""
    import server.allocator as allocator

    calls = []
    loop = asyncio.get_running_loop()
    twice = asyncio.Event()

    class Libc:
        def malloc_trim(self, pad: int) -> int:  # called in a worker thread
            calls.append(pad)
            if len(calls) == 2:
                loop.call_soon_threadsafe(twice.set)
            return 1

    monkeypatch.setattr(allocator, "_glibc", Libc)
    task = asyncio.ensure_future(allocator.HeapTrimmer(0.01, 0).run())
    async with asyncio.timeout(5):
        await twice.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[:2] == [0, 0]
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert await allocator.HeapTrimmer(0.01).run() is None  # off glibc: nothing to do


async def _trims_seen(trimmer, trims: list[float], until: float) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(trimmer.run(lambda: trims.append(loop.time())))
    try:
        await asyncio.sleep(until)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_burst_of_closes_gets_one_trim_once_it_is_over():
    """Sessions that end get their heap back soon, not at the next 30 s period; a burst
    of closes costs one trim, after it, and trims keep their minimum gap."""
    from server.allocator import HeapTrimmer

    trims: list[float] = []
    trimmer = HeapTrimmer(30.0, 0.05, min_gap_s=0.3, max_wait_s=5.0)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def closes() -> None:
        for _ in range(10):  # a burst: 10 closes 20 ms apart
            trimmer.session_ended()
            await asyncio.sleep(0.02)
        burst_over.append(loop.time())
        await asyncio.sleep(0.1)
        trimmer.session_ended()  # another close right after the trim: waits for the gap

    burst_over: list[float] = []
    closer = asyncio.ensure_future(closes())
    await _trims_seen(trimmer, trims, 1.0)
    await closer
    assert len(trims) == 2, trims
    assert trims[0] >= burst_over[0]  # not during the burst
    assert trims[0] - start >= 0.3  # the minimum gap counts from the trimmer's start too
    assert trims[1] - trims[0] >= 0.3


async def test_closes_that_never_stop_still_get_a_trim():
    """A steady stream of closes (a busy server) is not a burst that never ends."""
    from server.allocator import HeapTrimmer

    trims: list[float] = []
    trimmer = HeapTrimmer(30.0, 0.1, min_gap_s=0.0, max_wait_s=0.3)

    async def closes() -> None:
        while True:
            trimmer.session_ended()
            await asyncio.sleep(0.02)

    closer = asyncio.ensure_future(closes())
    try:
        await _trims_seen(trimmer, trims, 1.0)
    finally:
        closer.cancel()
    assert len(trims) >= 2, trims


async def test_no_trim_after_closes_when_that_is_off():
    from server.allocator import HeapTrimmer

    trims: list[float] = []
    trimmer = HeapTrimmer(30.0, 0)
    trimmer.session_ended()
    await _trims_seen(trimmer, trims, 0.3)
    assert trims == []


def test_sessions_leaving_the_registry_tell_the_trimmer():
    """The app wires the registry's removals to the trimmer (server/app.py)."""
    from server.app import create_app
    from server.config import Settings

    app = create_app(Settings(api_tokens="t"))
    trimmer = app.state.duplex.trimmer
    session = SimpleNamespace(id="s1")
    app.state.duplex.registry.add("t", session)
    assert not trimmer._ended.is_set()
    app.state.duplex.registry.remove("t", session)
    assert trimmer._ended.is_set()


async def _four_sessions_answer(server, message: dict) -> None:
    """Four sessions send ``message`` at once; each answers a ping after it, no error."""

    async def one(k: int) -> list[dict]:
        async with connect(server, TOKEN) as c:
            await c.recv()
            await c.send(message)
            await c.send({"type": "ping", "id": f"after-{k}"})
            return await c.until("pong", timeout=30)

    replies = await asyncio.gather(*(one(k) for k in range(4)))
    assert all(r[-1]["id"] == f"after-{k}" for k, r in enumerate(replies))
    assert not [e for r in replies for e in r if e["type"] == "error"]
