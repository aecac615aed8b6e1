"""Drive a program on a pseudo-terminal: send lines and Ctrl+C, read what the screen shows.

The child gets the pty as its controlling terminal (pty.fork), so a written `\\x03` is
turned into SIGINT by the terminal driver, exactly as when a user presses Ctrl+C.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import time


class PtyProcess:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: str):
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        self.pid, self.fd = pid, fd
        self.screen = ""

    def read_until(self, needle: str, timeout: float = 60.0, start: int = 0) -> int:
        """Read until `needle` appears in the screen after offset `start`; returns its end offset."""
        deadline = time.monotonic() + timeout
        while (i := self.screen.find(needle, start)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{needle!r} not seen; screen so far:\n{self.screen[-3000:]}")
            if select.select([self.fd], [], [], min(remaining, 0.5))[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise EOFError(f"child closed the terminal before {needle!r}:\n{self.screen[-3000:]}")
                self.screen += data.decode("utf-8", errors="replace")
        return i + len(needle)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Drain output so the child never blocks on a full terminal buffer.
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.fd, 65536).decode("utf-8", errors="replace")
                except OSError:
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        self.kill()
        raise TimeoutError("child did not exit")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
