"""Adaptive end of turn: turn F1 and end-of-turn latency, fixed `stop_ms` against "auto".

Run: ``python -m bench.bench_eot`` (``--quick`` for fewer files). Prints markdown. Offline
and deterministic: no timing is measured, only the audio clock.

Speakers of two pause habits talk in espeak-ng conversations (tests/speech.py): "short"
pauses of 100-300 ms inside turns, "long" pauses of 500-900 ms; 2-4 phrases a turn, gaps
of 1.5-2.5 s between turns, 10 turns a session, clean and with pink noise at 10 dB SNR.
Every conversation goes, in 20 ms pushes, through a fresh TurnDetector per setting (fixed
`stop_ms` 500, 800, 1200 and adaptive), one setting after the other for each file, so all
settings see the same audio in the same run.

Turn F1 as in bench_vad (onset within 100 ms, one-to-one). Latency: from the true end of
a matched turn's speech (its last audible sample) to the point on the audio clock where
`TurnEnd` came out, i.e. what the user waits for beyond the detector's own
processing time. Turns cut short (split, ending over 350 ms before the true end) are
counted in F1 but not in latency.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.bench_vad import match, split_merged
from tests.speech import ENGLISH_VOICES, Conversation, make_conversation
from vad.detector import SpeechDetector
from vad.turns import TurnConfig, TurnDetector, TurnEnd

SEED_BASE = 300_000  # disjoint from the tests, bench_vad and bench_turns
PAUSES = {"short": (100.0, 300.0), "long": (500.0, 900.0)}
NOISES: tuple[tuple[str | None, float | None], ...] = ((None, None), ("pink", 10.0))
SETTINGS: dict[str, TurnConfig] = {
    "stop_ms 500": TurnConfig(stop_ms=500),
    "stop_ms 800": TurnConfig(stop_ms=800),
    "stop_ms 1200": TurnConfig(stop_ms=1200),
    'stop_ms "auto"': TurnConfig(adaptive_stop=True),
}
PUSH_BYTES = 640  # 20 ms of 16 kHz int16
WHOLE_TURN_MS = 350  # a turn ending earlier than its true end was split: no latency


@dataclass
class Tally:
    true_turns: int = 0
    detected: int = 0
    matched: int = 0
    split: int = 0
    merged: int = 0
    latencies: list[float] = field(default_factory=list)
    learned_stop: list[float] = field(default_factory=list)

    @property
    def f1(self) -> float:
        p = self.matched / self.detected if self.detected else 1.0
        r = self.matched / self.true_turns if self.true_turns else 1.0
        return 2 * p * r / (p + r) if p + r else 0.0


def conversation(habit: str, noise: int, index: int, n_turns: int, cache: Path) -> Conversation:
    kind, snr = NOISES[noise]
    return make_conversation(
        SEED_BASE + 10_000 * list(PAUSES).index(habit) + 1000 * noise + index,
        n_turns,
        voices=ENGLISH_VOICES,
        noise=kind,
        snr_db=snr,
        pause_ms=PAUSES[habit],
        max_phrases=4,
        cache_dir=cache,
    )


def run_session(audio: np.ndarray, config: TurnConfig) -> tuple[list[tuple[TurnEnd, float]], float]:
    """(TurnEnd, audio clock in ms when it came out) per turn; the final `stop_ms`."""
    td = TurnDetector(config, SpeechDetector())
    data = audio.astype("<i2").tobytes()
    out: list[tuple[TurnEnd, float]] = []
    for i in range(0, len(data) - PUSH_BYTES + 1, PUSH_BYTES):
        for event in td.push_pcm(data[i : i + PUSH_BYTES]):
            if isinstance(event, TurnEnd):
                out.append((event, td.clock_ms))
    out += [(e, td.clock_ms) for e in td.flush() if isinstance(e, TurnEnd)]
    return out, td.stop_ms


def measure(n_files: int, n_turns: int, cache: Path) -> dict[tuple[str, str], Tally]:
    tallies = {(h, s): Tally() for h in PAUSES for s in SETTINGS}
    for habit in PAUSES:
        for noise in range(len(NOISES)):
            for index in range(n_files):
                conv = conversation(habit, noise, index, n_turns, cache)
                for name, config in SETTINGS.items():  # interleaved: same file, each setting
                    found, stop = run_session(conv.audio, config)
                    turns = [t for t, _ in found]
                    pairs = match(conv.turns, turns)
                    split, merged = split_merged(conv.turns, turns)
                    tally = tallies[habit, name]
                    tally.true_turns += len(conv.turns)
                    tally.detected += len(turns)
                    tally.matched += len(pairs)
                    tally.split += split
                    tally.merged += merged
                    tally.latencies += [
                        found[j][1] - conv.turns[i][1]
                        for i, j in pairs
                        if turns[j].end_ms >= conv.turns[i][1] - WHOLE_TURN_MS
                    ]
                    tally.learned_stop.append(stop)
    return tallies


def report(tallies: dict[tuple[str, str], Tally], n_files: int, n_turns: int) -> str:
    lines = [
        f"{n_files} sessions of {n_turns} turns per speaker type and noise "
        f"({', '.join('clean' if k is None else f'{k} {s:g} dB' for k, s in NOISES)}).",
        "",
        "| speaker | setting | true turns | detected | split / merged | F1 "
        "| latency p50 ms | latency p90 ms | stop_ms at session end (min-max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for habit, (lo, hi) in PAUSES.items():
        for name in SETTINGS:
            t = tallies[habit, name]
            p50, p90 = (np.percentile(t.latencies, q) for q in (50, 90))
            lines.append(
                f"| {habit} pauses ({lo:g}-{hi:g} ms) | {name} | {t.true_turns} | {t.detected} "
                f"| {t.split} / {t.merged} | {t.f1:.3f} | {p50:.0f} | {p90:.0f} "
                f"| {min(t.learned_stop):.0f}-{max(t.learned_stop):.0f} |"
            )
    lines.append("")
    for habit in PAUSES:
        auto = tallies[habit, 'stop_ms "auto"']
        best = max(tallies[habit, s].f1 for s in SETTINGS if s != 'stop_ms "auto"')
        ref = np.percentile(tallies[habit, "stop_ms 800"].latencies, 50)
        mine = np.percentile(auto.latencies, 50)
        lines.append(
            f"- {habit} pauses: auto F1 {auto.f1:.3f} vs best fixed {best:.3f} "
            f"({'met' if auto.f1 >= best else 'NOT met'}); p50 latency {mine:.0f} ms vs "
            f"{ref:.0f} ms at stop_ms 800 ({(1 - mine / ref) * 100:.0f}% lower)."
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8, help="sessions per speaker and noise")
    parser.add_argument("--turns", type=int, default=10, help="turns per session")
    parser.add_argument("--quick", action="store_true", help="3 sessions per speaker and noise")
    args = parser.parse_args(argv)
    n_files = 3 if args.quick else args.files
    with tempfile.TemporaryDirectory(prefix="duplex-bench-eot-") as tmp:
        tallies = measure(n_files, args.turns, Path(tmp))
    print(report(tallies, n_files, args.turns))


if __name__ == "__main__":
    main()
