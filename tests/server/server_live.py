"""Start and stop the real `ds4-server` process for live tests (127.0.0.1 only); the
official `openai` and `anthropic` clients pointed at one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """`python -m dwarfstar.server.main` on a free port; `url` is its base URL."""

    def __init__(self, model: Path, tmp: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.trace = tmp / f"trace-{self.port}.txt"
        env = dict(os.environ, DS4_LOCK_FILE=str(tmp / f"lock-{self.port}"),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        args = [sys.executable, "-m", "dwarfstar.server.main", "-m", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), "--ctx", "4096", "-n", "12", "--cpu", "--trace", str(self.trace), *extra]
        self.log = open(tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(args, cwd=str(REPO), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ds4-server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("ds4-server did not start: " + self.output())

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def claude(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
