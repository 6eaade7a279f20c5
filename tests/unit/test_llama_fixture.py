"""The llama.cpp fixture reports a dead server as a crash, with its exit status and log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures.upstream import LlamaServer


def test_a_crashed_server_reports_signal_and_log(tmp_path: Path) -> None:
    log = tmp_path / "llama.log"
    code = "import os, signal, sys; print('loading model'); sys.stdout.flush(); os.kill(os.getpid(), signal.SIGSEGV)"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT)
        proc.wait(timeout=30)
    server = LlamaServer(url="http://127.0.0.1:1/v1", model="m", gguf=tmp_path / "m.gguf", proc=proc, log_path=log)
    death = server.death()
    assert death is not None
    assert "SIGSEGV" in death
    assert "loading model" in death


def test_a_running_server_reports_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        server = LlamaServer(url="u", model="m", gguf=tmp_path / "m.gguf", proc=proc, log_path=tmp_path / "none.log")
        assert server.death() is None
    finally:
        proc.kill()
        proc.wait()
