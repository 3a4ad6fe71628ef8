"""The `openai` npm package's Node client (OpenAIRealtimeWS) against a real Duplex server:
a text turn and a spoken turn. The package is installed into a temporary folder."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOKEN
from tests.speech import resample, synth

SCRIPT = Path(__file__).parent / "node" / "realtime_turns.mjs"


@pytest.fixture(scope="module")
def node_openai(tmp_path_factory: pytest.TempPathFactory) -> Path:
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node/npm are not installed: the Node client test needs them")
    folder = tmp_path_factory.mktemp("node-openai")
    (folder / "package.json").write_text('{"name": "duplex-realtime-test", "private": true}')
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "openai@^6", "ws@^8"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"npm install failed: {result.stderr[-2000:]}"
    shutil.copy(SCRIPT, folder / SCRIPT.name)
    return folder


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1: the Node client always connects with wss."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_node_client_text_and_spoken_turns(node_openai: Path, server_factory: Any, tmp_path: Path):
    key, cert = self_signed(tmp_path)
    server = server_factory(uvicorn_kwargs={"ssl_keyfile": str(key), "ssl_certfile": str(cert)})
    speech = tmp_path / "speech.pcm"
    speech.write_bytes(
        resample(synth("Hello there, how are you today?"), 16000, 24000).astype("<i2").tobytes()
    )
    base = server.base.replace("http://", "https://", 1) + "/v1"
    result = subprocess.run(
        [shutil.which("node") or "node", SCRIPT.name, base, TOKEN, str(speech)],
        cwd=node_openai,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kinds = [e["type"] for e in events]
    assert "client.error" not in kinds and "error" not in kinds, kinds
    assert kinds[0] == "session.created"
    first_done = kinds.index("response.done")
    text_turn, spoken = events[: first_done + 1], events[first_done + 1 :]
    transcript = "".join(
        e["delta"] for e in text_turn if e["type"] == "response.output_audio_transcript.delta"
    )
    assert transcript == "You said: \u201cHello from Node\u201d"
    spoken_kinds = [e["type"] for e in spoken]
    for kind in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "response.output_audio.delta",
        "response.done",
    ):
        assert kind in spoken_kinds, (kind, spoken_kinds)
    assert spoken[-1]["response"]["status"] == "completed"
