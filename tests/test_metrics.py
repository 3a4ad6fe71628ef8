"""Prometheus metrics scraped from real servers after real turns: on the main port behind
a token, on a separate port, off; the figures match what the client saw."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from tests.conftest import TOKEN
from tests.fakes.openai_realtime import FakeOpenAIRealtime
from tests.speech import synth
from tests.wsutil import connect

METRICS_TOKEN = "metrics-secret"
SILENCE_1S = np.zeros(16000, dtype=np.int16)


async def scrape(url: str, token: str | None = METRICS_TOKEN) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as http:
        reply = await http.get(url, headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def until_no_live_sessions(url: str) -> dict[tuple[str, tuple], float]:
    """Scrape until every session has closed (its counters are flushed at the close; the
    servers here run with no resume grace, so a hang-up closes the session)."""
    async with asyncio.timeout(10):
        while True:
            samples = await scrape(url)
            if not any(name == "duplex_live_sessions" and v for (name, _), v in samples.items()):
                return samples
            await asyncio.sleep(0.05)


async def stream(c: Any, pcm: np.ndarray) -> int:
    """Send ``pcm`` as 20 ms binary messages; the number sent."""
    data = pcm.astype("<i2").tobytes()
    count = 0
    for i in range(0, len(data), 640):
        await c.send(data[i : i + 640])
        count += 1
    return count


async def test_metrics_on_the_main_port_after_a_real_turn(server_factory: Any) -> None:
    server = server_factory(
        echo_pace=1.0, metrics="on", metrics_token=METRICS_TOKEN, resume_grace_s=0
    )
    url = f"{server.base}/metrics"
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).status_code == 401
        for wrong in ("nope", TOKEN):  # an API token is not the metrics token
            reply = await http.get(url, headers={"Authorization": f"Bearer {wrong}"})
            assert reply.status_code == 401

    async with connect(server, "not-a-token") as c:  # refused: counted as error 401
        assert (await c.recv())["code"] == 401

    speech = synth("Could you tell me about the weather tomorrow please", "en", 150)
    async with connect(server, TOKEN) as c:
        await c.recv()
        sent = await stream(c, np.concatenate([speech, SILENCE_1S]))
        events = await c.until("response.started", timeout=20)
        response_id = events[-1]["response_id"]
        audio_chunks = 0
        while audio_chunks < 5:  # half a second of reply audio
            event = await c.recv()
            audio_chunks += event["type"] == "chunk" and "media" in event
        live = await scrape(url)
        assert value(live, "duplex_live_sessions", mode="vad", provider="echo") == 1
        await c.send({"type": "playback", "response_id": response_id, "played_ms": 400})
        sent += 1 + await stream(c, speech[:16000])  # the user talks over the reply: barge-in
        done = (await c.until("response.done", timeout=10))[-1]
        assert done["finish_reason"] == "interrupted"
        await c.send({"type": "no.such.type"})  # bad input: error 400, not admitted
        assert (await c.until("error"))[-1]["code"] == 400
        await c.send({"type": "ping"})
        await c.until("pong")
        sent += 1
        seen = len(c.seen)

    samples = await until_no_live_sessions(url)
    assert value(samples, "duplex_messages_received_total") == sent
    assert value(samples, "duplex_messages_sent_total") >= seen
    assert value(samples, "duplex_errors_total", code="401") == 1
    assert value(samples, "duplex_errors_total", code="400") == 1
    assert value(samples, "duplex_barge_ins_total") == 1
    assert value(samples, "duplex_responses_total", finish_reason="interrupted") == 1
    assert value(samples, "duplex_provider_reconnects_total") == 0
    assert value(samples, "duplex_end_of_turn_overhead_seconds_count") == 1
    assert value(samples, "duplex_end_of_turn_overhead_seconds_sum") > 0
    for name in ("first_token", "first_audio"):
        assert value(samples, f"duplex_provider_{name}_seconds_count", provider="echo") == 1
    assert value(samples, "duplex_response_latency_seconds_count", provider="echo") == 1
    # The turn's stop_ms (800 ms of silence the user waits through) is part of it.
    assert value(samples, "duplex_response_latency_seconds_sum", provider="echo") >= 0.8
    for op in ("create_session", "append_messages"):
        assert value(samples, "duplex_store_operation_seconds_count", operation=op) >= 1


async def test_metrics_on_a_separate_port_without_a_token(server_factory: Any) -> None:
    server = server_factory(metrics="port", metrics_port=0)
    url = f"http://127.0.0.1:{server.app.state.metrics_port}/metrics"
    async with connect(server, TOKEN) as c:
        await c.recv()
        await c.ask("hello")
        live = await scrape(url, token=None)
        assert value(live, "duplex_live_sessions", mode="vad", provider="echo") == 1
        assert value(live, "duplex_responses_total", finish_reason="stop") == 1
        assert value(live, "duplex_provider_first_token_seconds_count", provider="echo") == 1
        # A text turn ends with the message that carries it.
        assert value(live, "duplex_end_of_turn_overhead_seconds_count") == 1
    async with httpx.AsyncClient() as http:  # not on the main port
        assert (await http.get(f"{server.base}/metrics")).status_code == 404


async def test_metrics_off_by_default(live_server: Any) -> None:
    async with httpx.AsyncClient() as http:
        reply = await http.get(
            f"{live_server.base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert reply.status_code == 404
    assert live_server.app.state.duplex.metrics is None
    assert live_server.app.state.duplex.services.tap is None  # sessions pay nothing


def test_main_port_metrics_need_a_token() -> None:
    with pytest.raises(ValueError, match="DUPLEX_METRICS_TOKEN"):
        Settings(metrics="on")


async def test_provider_reconnects_are_counted_and_are_not_barge_ins(server_factory: Any) -> None:
    async with FakeOpenAIRealtime(scenario="drop") as fake:
        server = server_factory(
            openai_realtime_url=fake.base_url,
            openai_api_key="sk-test-duplex-fake",
            metrics="on",
            metrics_token=METRICS_TOKEN,
            resume_grace_s=0,  # a hang-up closes the session at once
        )
        async with connect(server, TOKEN) as c:
            await c.recv()
            config = {"mode": "asm", "provider": "openai-realtime"}
            await c.send({"type": "session.update", "config": config})
            await c.until("session.updated")
            await c.send({"type": "input.text", "text": "Hi", "final": True})
            assert (await c.until("response.done", timeout=15))[-1]["finish_reason"] == (
                "interrupted"
            )
            await c.until("provider.reconnect", timeout=10)
            live = await scrape(f"{server.base}/metrics")
            assert value(live, "duplex_live_sessions", mode="asm", provider="openai-realtime") == 1
        samples = await until_no_live_sessions(f"{server.base}/metrics")
    assert value(samples, "duplex_provider_reconnects_total") == 1
    assert value(samples, "duplex_responses_total", finish_reason="interrupted") == 1
    assert value(samples, "duplex_barge_ins_total") == 0


async def test_adaptive_end_of_turn_is_measured_too(server_factory: Any) -> None:
    """``stop_ms: "auto"`` (learned per session): the turn is measured, nothing breaks."""
    server = server_factory(metrics="on", metrics_token=METRICS_TOKEN, resume_grace_s=0)
    speech = synth("Set a timer for fifteen minutes please", "en", 150)
    async with connect(server, TOKEN) as c:
        await c.recv()
        await c.send({"type": "session.update", "config": {"turn_detection": {"stop_ms": "auto"}}})
        await c.until("session.updated")
        await stream(c, np.concatenate([speech, SILENCE_1S, SILENCE_1S]))
        assert (await c.until("response.done", timeout=20))[-1]["finish_reason"] == "stop"
    samples = await until_no_live_sessions(f"{server.base}/metrics")
    assert value(samples, "duplex_response_latency_seconds_count", provider="echo") == 1
    assert value(samples, "duplex_end_of_turn_overhead_seconds_count") == 1
