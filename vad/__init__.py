"""Speech and turn detection: plain library, int16 frames in, decisions and turn events out.

`vad.detector.SpeechDetector` classifies frames (webrtcvad behind an adaptive noise floor);
`vad.turns.TurnDetector` turns those decisions into turns. See docs/turn-taking.md.
"""
