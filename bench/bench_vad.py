"""VAD benchmark: turn accuracy under noise, and CPU cost relative to bare webrtcvad.

Run: ``python -m bench.bench_vad`` (``--quick`` for a smaller set). Prints markdown.

Accuracy: espeak-ng conversations from tests/speech.py (seeds disjoint from the unit
tests and from the seeds used while tuning), one fresh detector per file, and the default
settings for every file and condition. Conditions (`conditions`): clean; every noise of
`tests.speech.ALL_NOISES` (white, pink, hum; 1/f and brown with no 20 Hz floor, rumble,
babble, music, keyboard) and a speaker stepping back, at 20, 10 and 5 dB SNR. Split and
merged turns are counted. A detected turn (TurnEnd) matches a true turn
when its onset is within 100 ms of the true onset. Matching is one-to-one, greedy by onset
error. Precision = matched / detected, recall = matched / true. End errors are reported
for matched turns (positive: we end later than the last audible sample).

CPU: `time.process_time` over the same frames for a bare loop of
``webrtcvad.Vad.is_speech`` on ready-made bytes, and for SpeechDetector + TurnDetector fed
through a `frames_source`, which turns one file's audio into the chunks a server would push:
by default bytes, as they come off the network, into `TurnDetector.push_pcm` (arrays go to
`push_many`). Swap `frames_source` to include decoding, resampling and framing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import webrtcvad

from tests.speech import ALL_NOISES, Conversation, frames_of, make_conversation
from vad.detector import DetectorConfig, SpeechDetector
from vad.turns import TurnConfig, TurnDetector, TurnEnd

ONSET_TOLERANCE_MS = 100.0
SNRS = (20.0, 10.0, 5.0)
SEED_BASE = 100_000  # unit tests use seeds < 100, tuning used 5000-5029
CHUNK_FRAMES = (1, 5, 50)  # 20 ms, 100 ms and 1 s pushes

FramesSource = Callable[[np.ndarray], Iterable[np.ndarray | bytes]]


def chunked_frames(
    audio: np.ndarray, chunk_frames: int = 5, frame_samples: int = 320
) -> Iterator[np.ndarray]:
    """(chunk_frames, frame_samples) int16 blocks."""
    frames = frames_of(audio, frame_samples)
    for i in range(0, len(frames), chunk_frames):
        yield frames[i : i + chunk_frames]


def chunked_pcm(
    audio: np.ndarray, chunk_frames: int = 5, frame_samples: int = 320
) -> Iterator[bytes]:
    """Default source: whole frames as bytes, `chunk_frames` at a time, like network chunks."""
    data = frames_of(audio, frame_samples).tobytes()
    step = 2 * frame_samples * chunk_frames
    for i in range(0, len(data), step):
        yield data[i : i + step]


@dataclass(frozen=True)
class Score:
    condition: str
    files: int
    true_turns: int
    detected: int
    matched: int
    onset_errors: list[float]
    end_errors: list[float]
    split: int = 0  # true turns that two or more detected turns overlap
    merged: int = 0  # detected turns that overlap two or more true turns

    @property
    def precision(self) -> float:
        return self.matched / self.detected if self.detected else 1.0

    @property
    def recall(self) -> float:
        return self.matched / self.true_turns if self.true_turns else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def detect_turns(
    audio: np.ndarray,
    turn_config: TurnConfig | None = None,
    detector_config: DetectorConfig | None = None,
) -> list[TurnEnd]:
    """Run a fresh detector over a whole file and flush at the end."""
    td = TurnDetector(turn_config or TurnConfig(), SpeechDetector(detector_config))
    events = td.push_many(frames_of(audio, td.detector.frame_samples)) + td.flush()
    return [e for e in events if isinstance(e, TurnEnd)]


def match(truth: Sequence[tuple[float, float]], found: Sequence[TurnEnd]) -> list[tuple[int, int]]:
    """One-to-one pairs (truth index, found index) with onset error within tolerance."""
    candidates = sorted(
        (abs(f.start_ms - t[0]), i, j)
        for i, t in enumerate(truth)
        for j, f in enumerate(found)
        if abs(f.start_ms - t[0]) <= ONSET_TOLERANCE_MS
    )
    used_t: set[int] = set()
    used_f: set[int] = set()
    pairs = []
    for _, i, j in candidates:
        if i not in used_t and j not in used_f:
            used_t.add(i)
            used_f.add(j)
            pairs.append((i, j))
    return pairs


def split_merged(truth: Sequence[tuple[float, float]], found: Sequence[TurnEnd]) -> tuple[int, int]:
    """(true turns overlapped by 2+ detected turns, detected turns overlapping 2+ true)."""

    def overlap(a: tuple[float, float], f: TurnEnd) -> bool:
        return f.start_ms < a[1] and a[0] < f.end_ms

    split = sum(sum(overlap(t, f) for f in found) > 1 for t in truth)
    merged = sum(sum(overlap(t, f) for t in truth) > 1 for f in found)
    return split, merged


def score(name: str, conversations: Iterable[Conversation]) -> Score:
    files = n_true = n_found = n_matched = n_split = n_merged = 0
    onset_err: list[float] = []
    end_err: list[float] = []
    for conv in conversations:
        found = detect_turns(conv.audio)
        pairs = match(conv.turns, found)
        files += 1
        n_true += len(conv.turns)
        n_found += len(found)
        n_matched += len(pairs)
        split, merged = split_merged(conv.turns, found)
        n_split, n_merged = n_split + split, n_merged + merged
        onset_err += [found[j].start_ms - conv.turns[i][0] for i, j in pairs]
        end_err += [found[j].end_ms - conv.turns[i][1] for i, j in pairs]
    return Score(name, files, n_true, n_found, n_matched, onset_err, end_err, n_split, n_merged)


STEP_BACK_DB = (10.0, 15.0)  # "step-back": speech drops this much halfway (pink noise)


def conditions() -> list[tuple[str, str | None, float | None]]:
    """(name, noise, SNR). Names keep their order across versions: seeds follow it.

    "step-back" is pink noise with the speaker stepping back halfway (speech 10-15 dB
    quieter from the middle turn on; the SNR is that of the far speech)."""
    return (
        [("clean", None, None)]
        + [(f"{noise} {snr:g} dB", noise, snr) for noise in ALL_NOISES for snr in SNRS]
        + [(f"step-back {snr:g} dB", "pink", snr) for snr in SNRS]
    )


def conversation(
    condition: int, index: int, n_turns: int, cache_dir: Path | None = None
) -> Conversation:
    name, noise, snr = conditions()[condition]
    seed = SEED_BASE + 1000 * condition + index
    step_back = STEP_BACK_DB if name.startswith("step-back") else None
    return make_conversation(
        seed, n_turns, noise=noise, snr_db=snr, step_back_db=step_back, cache_dir=cache_dir
    )


def accuracy(n_files: int, n_turns: int, cache_dir: Path) -> list[Score]:
    return [
        score(name, (conversation(c, i, n_turns, cache_dir) for i in range(n_files)))
        for c, (name, _, _) in enumerate(conditions())
    ]


@dataclass(frozen=True)
class CpuResult:
    """CPU seconds (best of the runs) on the same audio, and the median per-run ratio."""

    label: str
    audio_s: float
    bare_s: float  # webrtcvad.Vad.is_speech loop, the public API
    vad_s: float  # SpeechDetector + TurnDetector fed by `frames_source`
    ratio: float  # median over runs of vad_s / bare_s, measured back to back

    def per_frame_us(self, seconds: float) -> float:
        return seconds / self.audio_s * 1e6 * DetectorConfig().frame_ms / 1000


def cpu_cost(
    audios: Sequence[np.ndarray],
    frames_source: FramesSource = chunked_pcm,
    label: str = "100 ms chunks",
    repeats: int = 7,
) -> CpuResult:
    """CPU time of our VAD path vs bare webrtcvad on the same frames, interleaved per file.

    Both loops alternate file by file, `repeats` times, so that load from other processes
    hits both alike. Each file gets fresh detectors, as a new session would.
    """
    cfg = DetectorConfig()
    frame_bytes = [[f.tobytes() for f in frames_of(a, cfg.frame_samples)] for a in audios]
    audio_s = sum(len(fb) for fb in frame_bytes) * cfg.frame_ms / 1000
    runs: list[tuple[float, float]] = []
    for _ in range(repeats):
        bare = ours = 0.0
        for audio, fb in zip(audios, frame_bytes, strict=True):
            t0 = time.process_time()
            vad = webrtcvad.Vad(cfg.aggressiveness)
            for b in fb:
                vad.is_speech(b, cfg.sample_rate)
            t1 = time.process_time()
            td = TurnDetector(TurnConfig(), SpeechDetector(cfg))
            for chunk in frames_source(audio):
                if isinstance(chunk, bytes):
                    td.push_pcm(chunk)
                else:
                    td.push_many(chunk)
            td.flush()
            t2 = time.process_time()
            bare, ours = bare + t1 - t0, ours + t2 - t1
        runs.append((bare, ours))
    return CpuResult(
        label=label,
        audio_s=audio_s,
        bare_s=min(r[0] for r in runs),
        vad_s=min(r[1] for r in runs),
        ratio=statistics.median(r[1] / r[0] for r in runs),
    )


def _ms(xs: list[float], q: float) -> str:
    return f"{np.percentile(np.abs(xs), q):.0f}" if xs else "-"


def _row(s: Score, bold: bool = False) -> str:
    name, f1 = (f"**{s.condition}**", f"**{s.f1:.3f}**") if bold else (s.condition, f"{s.f1:.3f}")
    bias = f"{statistics.fmean(s.end_errors):+.0f}" if s.end_errors else "-"
    return (
        f"| {name} | {s.files} | {s.true_turns} | {s.detected} | {s.precision:.3f} "
        f"| {s.recall:.3f} | {f1} | {_ms(s.onset_errors, 50)} / {_ms(s.onset_errors, 95)} "
        f"| {_ms(s.end_errors, 50)} / {_ms(s.end_errors, 95)} | {bias} | {s.split} / {s.merged} |"
    )


def report(scores: list[Score], cpu: list[CpuResult]) -> str:
    def pooled(name: str, group: list[Score]) -> Score:
        return Score(
            name,
            sum(s.files for s in group),
            sum(s.true_turns for s in group),
            sum(s.detected for s in group),
            sum(s.matched for s in group),
            [e for s in group for e in s.onset_errors],
            [e for s in group for e in s.end_errors],
            sum(s.split for s in group),
            sum(s.merged for s in group),
        )

    lines = [
        "| condition | files | true turns | detected | P | R | F1 "
        "| \\|onset err\\| p50 / p95 ms | \\|end err\\| p50 / p95 ms | mean end err ms "
        "| split / merged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_row(s) for s in scores),
        _row(pooled("all 5 dB", [s for s in scores if s.condition.endswith(" 5 dB")]), True),
        _row(
            pooled(
                "white, pink, hum, clean (the earlier set)",
                [s for s in scores if s.condition.split()[0] in ("clean", "white", "pink", "hum")],
            ),
            True,
        ),
        _row(pooled("all", scores), True),
        "",
        "| CPU (process time), fresh detectors per file | µs per 20 ms frame "
        "| ratio to bare `Vad.is_speech` |",
        "|---|---:|---:|",
        f"| bare `webrtcvad.Vad.is_speech` loop | {cpu[0].per_frame_us(cpu[0].bare_s):.2f} "
        "| 1.00 |",
        *(
            f"| SpeechDetector + TurnDetector, {c.label} | {c.per_frame_us(c.vad_s):.2f} "
            f"| **{c.ratio:.2f}** |"
            for c in cpu
        ),
        "",
        f"CPU on {cpu[0].audio_s:.0f} s of audio (one file per condition). Times are the "
        "best of 7 runs, ratios the median of per-run ratios, both loops interleaved.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=32, help="conversations per condition")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation")
    parser.add_argument("--quick", action="store_true", help="8 files per condition")
    args = parser.parse_args(argv)
    n_files = 8 if args.quick else args.files
    with tempfile.TemporaryDirectory(prefix="duplex-bench-speech-") as tmp:
        scores = accuracy(n_files, args.turns, Path(tmp))
        audios = [conversation(c, 0, args.turns, Path(tmp)).audio for c in range(len(scores))]
    cpu = [
        cpu_cost(audios, partial(chunked_pcm, chunk_frames=n), f"{n * 20} ms chunks")
        for n in CHUNK_FRAMES
    ]
    print(report(scores, cpu))


if __name__ == "__main__":
    main()
