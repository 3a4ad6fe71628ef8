"""bench_relay's Duplex server admits the run's audio without pacing it.

The bench sends 900 ms of audio per trial in a few milliseconds. Under the default input
rate limit the burst ran out after ~70 trials and each later tone waited ~7 ms for its
budget, which the audio row reported as relay time. No clock is involved here: the budget
is asked for every message of a run at once, so it can only refill less than in a real run.
"""

from __future__ import annotations

import argparse

import pytest

from bench import bench_relay
from bench.bench_relay import OPENING_MS, SILENCE_MS, TONE_MS, WARMUP, silence, tone
from server.config import Settings
from server.rate import InputBudget

RATE = 16000
BYTES_PER_S = RATE * 2.0


def admitted(env: dict[str, str], args: argparse.Namespace, monkeypatch) -> int:
    """How many of the relay audio session's messages the budget takes without a wait."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    budget = InputBudget.of(
        s.audio_rate_limit, s.audio_burst_s, s.message_rate_limit, s.message_burst
    )
    loud, quiet = tone(RATE, TONE_MS), silence(RATE, SILENCE_MS)
    messages = [silence(RATE, OPENING_MS)]
    messages += [loud, quiet] * (WARMUP + bench_relay.measured_trials(args))
    return sum(budget.try_audio(len(m), BYTES_PER_S) for m in messages)


@pytest.mark.parametrize("trials,block", [(600, 50), (150, 50), (10, 50)])
def test_the_whole_run_fits_the_audio_burst(trials, block, monkeypatch):
    args = argparse.Namespace(trials=trials, block=block)
    total = 1 + 2 * (WARMUP + bench_relay.measured_trials(args))
    assert admitted(bench_relay.server_env("ws://127.0.0.1:1/v1", args), args, monkeypatch) == (
        total
    )


def test_the_default_burst_would_pace_the_run(monkeypatch):
    """The check above can fail: with the default settings the run outgrows the burst."""
    monkeypatch.delenv("DUPLEX_AUDIO_BURST_S", raising=False)
    monkeypatch.delenv("DUPLEX_AUDIO_RATE_LIMIT", raising=False)
    args = argparse.Namespace(trials=600, block=50)
    total = 1 + 2 * (WARMUP + bench_relay.measured_trials(args))
    assert admitted({}, args, monkeypatch) < total
