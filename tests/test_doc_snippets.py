"""Every ``python`` and ``bash`` block in README.md and docs/ runs, as a file, against a
real server (before: the README's SDK snippet failed as written).

The blocks are written for a reader, with the placeholders the docs use; the test puts
the real values in before running them:

* ``dev-...`` (the token `duplex serve` prints) becomes this server's token;
* ``127.0.0.1:8000`` becomes this server's address, and ``$DUPLEX_URL`` names it, so
  ``duplex client`` without ``--url`` talks to it;
* ``sess_...`` becomes a session of that token's tenant.

``duplex`` on the PATH runs ``python -m server.cli`` from this tree, in a scratch folder
holding the media files the examples name (``camera.h264``, ``phone.mov``). A block
right after a ``<!-- fragment: why -->`` line is not run (it serves forever, needs a
sound device, or uses the caller's variables); it must still parse (``compile`` for
Python, ``bash -n``). Blocks in other languages (JSON messages, sample output) are not
programs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from tests.conftest import TOKEN

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
FRAGMENT = re.compile(r"^<!--\s*fragment\b.*-->\s*$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    language: str
    code: str
    fragment: bool

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets() -> list[Snippet]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            match = FENCE.match(lines[i])
            if not match:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            language = match.group(1)
            if language in ("python", "bash"):
                fragment = i > 0 and bool(FRAGMENT.match(lines[i - 1]))
                code = "\n".join(lines[i + 1 : end]) + "\n"
                found.append(Snippet(path, i + 1, language, code, fragment))
            i = end + 1
    return found


SNIPPETS = snippets()


def test_the_docs_have_runnable_snippets():
    runnable = [s for s in SNIPPETS if not s.fragment]
    assert {s.language for s in runnable} == {"python", "bash"}
    assert any(s.path.name == "README.md" and s.language == "python" for s in runnable)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working folder with the media files the examples name, and `duplex` on PATH."""
    folder = tmp_path_factory.mktemp("snippets")
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "duplex"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m server.cli "$@"\n')
    shim.chmod(0o755)
    for name, fmt in (("camera.h264", "h264"), ("phone.mov", "mov")):
        with av.open(str(folder / name), "w", format=fmt) as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
            for i in range(20):
                img = np.full((120, 160, 3), i * 10, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return folder


def _filled(code: str, server, session_id: str) -> str:
    address = server.base.removeprefix("http://")
    return (
        code.replace("dev-...", TOKEN)
        .replace("127.0.0.1:8000", address)
        .replace("sess_...", session_id)
    )


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, live_server, scratch: Path):
    if snippet.fragment:
        if snippet.language == "python":
            compile(snippet.code, snippet.name, "exec", flags=_TOP_LEVEL_AWAIT)
        else:
            checked = subprocess.run(["bash", "-n"], input=snippet.code, text=True)
            assert checked.returncode == 0, snippet.name
        return
    session_id = httpx.post(
        f"{live_server.base}/v1/sessions", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()["id"]
    code = _filled(snippet.code, live_server, session_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    env |= {"PYTHONPATH": str(ROOT), "PATH": f"{scratch / 'bin'}:{env.get('PATH', '')}"}
    env["DUPLEX_URL"] = live_server.ws_url  # what `duplex client` connects to by default
    if snippet.language == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    result = subprocess.run(
        command, cwd=scratch, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"{snippet.name} failed:\n{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr
    assert '"type": "error"' not in result.stdout, result.stdout
    if snippet.language == "python":  # each answer printed once, not once per delta
        quoted = re.findall(r"You said: \u201c([^\u201d\n]*)", result.stdout)
        for i, text in enumerate(quoted):
            later = quoted[i + 1 :]
            assert not any(other.startswith(text) for other in later), result.stdout


#: Fragments may use ``await`` at the top level: they are bodies of the reader's function.
_TOP_LEVEL_AWAIT = 0x2000  # ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
