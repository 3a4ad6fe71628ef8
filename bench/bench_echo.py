"""Echo-aware barge-in over a grid of echo paths: false and missed/late barge-ins.

    python -m bench.bench_echo [--seeds 2] [--question]

Scenes from tests/echo_sim.py: a reply (espeak-ng, a low male voice) played into a room
whose echo reaches the microphone `delay` later, `attenuation` below the reply's level,
through an exponentially decaying noise impulse response (RT60); room noise at -60 dBFS.
For each grid point and seed, two scenes: echo alone (any barge-in is false) and the user
(another voice, at normal level) talking 2.5-4 s into the reply (a barge-in within 400 ms
of the onset is a hit; later is late; none is missed). Each scene runs through the default
turn detector as VAD mode runs it, with and without the echo-aware suppressor. Also the
CPU time per second of audio while a reply plays, with and without the suppressor.
"echo opened a turn": in the echo-only scene the detector opened a turn at some point
(the echo tail included), which VAD mode would answer as the user's. With `--question`
each scene starts with the user's question, and the reply plays 1 s after it ends
(end-of-turn silence plus the provider's latency), as every reply does on a server.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tests.echo_sim import BARGE_IN_DEADLINE_MS, barge_in_ms, make_scene, speech_starts
from vad.detector import DetectorConfig, SpeechDetector
from vad.echo import EchoSuppressor
from vad.turns import TurnConfig, TurnDetector

DELAYS = (40, 100, 200, 300)
ATTENUATIONS = (0, 5, 10, 15, 20)
RT60S = (200, 300, 400)
SEED_BASE = 1000  # the tests use seeds < 10


def _cpu_per_second(cache: Path) -> tuple[float, float]:
    """CPU seconds per audio-second of the default turn detector alone and with the
    suppressor in front of it, on a reply with a barge-in (0 dB echo: double talk),
    interleaved, min of 5 each."""
    scene = make_scene(SEED_BASE, 150, 0, 300, barge_in=True, cache_dir=cache)
    n = len(scene.mic) // 320 * 320
    mic, ref = scene.mic[:n].tobytes(), scene.ref[:n].tobytes()
    best = {False: float("inf"), True: float("inf")}
    for round_ in range(10):
        aware = bool(round_ % 2)
        detector = TurnDetector(TurnConfig(), SpeechDetector(DetectorConfig()))
        echo = EchoSuppressor() if aware else None
        t0 = time.process_time()
        for i in range(0, len(mic), 640):  # 20 ms messages, as they come off the network
            pcm = mic[i : i + 640]
            if echo is not None:
                pcm = echo.process(pcm, ref[i : i + 640])
            detector.push_pcm(pcm)
        best[aware] = min(best[aware], (time.process_time() - t0) / (n / 16000))
    return best[False], best[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--question", action="store_true", help="the user's question before each reply"
    )
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="bench-echo-"))
    # per (aware, attenuation): counts
    false = defaultdict(int)
    echo_turns = defaultdict(int)  # echo-only scenes in which the echo opened a turn
    hit = defaultdict(int)
    late = defaultdict(int)
    missed = defaultdict(int)
    n = defaultdict(int)
    latencies = defaultdict(list)
    failures: list[str] = []
    for seed in range(SEED_BASE, SEED_BASE + args.seeds):
        for delay in DELAYS:
            for atten in ATTENUATIONS:
                for rt60 in RT60S:
                    scene = {"cache_dir": cache, "question": args.question}
                    if args.question:
                        scene["lead_ms"] = 1000.0
                    echo_only = make_scene(seed, delay, atten, rt60, barge_in=False, **scene)
                    talk = make_scene(seed, delay, atten, rt60, barge_in=True, **scene)
                    assert talk.onset_ms is not None
                    for aware in (False, True):
                        key = (aware, atten)
                        n[key] += 1
                        if speech_starts(echo_only, aware):
                            echo_turns[key] += 1
                        if barge_in_ms(echo_only, aware) is not None:
                            false[key] += 1
                            if aware:
                                failures.append(f"false: seed {seed} {delay} ms {atten} dB {rt60}")
                        at = barge_in_ms(talk, aware)
                        if at is None:
                            missed[key] += 1
                        elif at < talk.onset_ms:  # the echo interrupted before the user
                            latencies[key].append(at - talk.onset_ms)
                        elif at - talk.onset_ms <= BARGE_IN_DEADLINE_MS:
                            hit[key] += 1
                            latencies[key].append(at - talk.onset_ms)
                        else:
                            late[key] += 1
                            latencies[key].append(at - talk.onset_ms)
                        if aware and (at is None or not 0 <= at - talk.onset_ms <= 400):
                            got = "none" if at is None else f"{at - talk.onset_ms:+.0f} ms"
                            failures.append(
                                f"barge-in {got}: seed {seed} {delay} ms {atten} dB {rt60}"
                            )
    print("scenes: the user's question, then the reply" if args.question else "scenes: a reply")
    print(f"grid: delays {DELAYS} ms x attenuation {ATTENUATIONS} dB x RT60 {RT60S} ms")
    print(f"x {args.seeds} seeds; per cell {n[(True, ATTENUATIONS[0])]} scenes of each kind\n")
    print(
        "| echo-aware | attenuation | false barge-in (echo only) | barge-in <= 400 ms "
        "| late | missed | early (before onset) | median latency | echo opened a turn |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for aware in (False, True):
        for atten in ATTENUATIONS:
            key = (aware, atten)
            lat = sorted(latencies[key])
            early = sum(1 for x in lat if x < 0)
            pos = [x for x in lat if x >= 0]
            med = f"{pos[len(pos) // 2]:.0f} ms" if pos else "-"
            total = n[key]
            print(
                f"| {'on' if aware else 'off'} | {atten} dB | {false[key]}/{total} | "
                f"{hit[key]}/{total} | {late[key]}/{total} | {missed[key]}/{total} | "
                f"{early}/{total} | {med} | {echo_turns[key]}/{total} |"
            )
    off, on = _cpu_per_second(cache)
    print(
        f"\nCPU while a reply plays, 20 ms messages: turn detector alone {off * 1000:.2f} ms "
        f"per audio-second, with the suppressor {on * 1000:.2f} ms ({on * 100:.2f}% of a core)"
    )
    if failures:
        print("\necho-aware failures:")
        for line in failures:
            print("  " + line)


if __name__ == "__main__":
    main()
