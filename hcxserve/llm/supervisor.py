"""Keeps a track's vLLM server running: the LLM service's command (`python -m hcxserve.llm.supervisor -- <vllm>`).

BentoML starts a service's command once and proxies to it; when vLLM dies (an engine crash, an OOM kill), nothing
starts it again and the track answers 503 until the whole bento is restarted. This process starts vLLM in a
session of its own and, when it exits without being asked to, cleans up what is left of it (engine and worker
processes that outlive the API server would hold the accelerator's memory) and starts it again after a short,
growing delay. More than `--max-restarts` restarts within `--window` seconds means a crash loop: it gives up and
exits, the LLM service's liveness (vLLM's `/health` through the proxy) fails, and the platform restarts the
service.

SIGTERM and SIGINT (Ctrl-C reaches this process's group, not vLLM's own session) stop vLLM with SIGTERM, which
finishes its running requests (`--shutdown-timeout`); whatever is still running `--grace` seconds later is killed.
SIGTERM for both: on SIGINT, vLLM's API server takes its engine's exit for a crash and logs it as an ERROR traceback
(EngineDeadError), on every Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque

logger = logging.getLogger("hcxserve.llm.supervisor")

_MAX_DELAY_S = 30.0


def _kill_session(pid: int) -> None:
    """Every process left in the session vLLM was started in (its process group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    def __init__(
        self, command: list[str], *, max_restarts: int, window_s: float, grace_s: float, first_delay_s: float = 1.0
    ) -> None:
        self.command = command
        self.first_delay_s = first_delay_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.grace_s = grace_s
        self.stopping = threading.Event()
        self._stop_deadline = float("inf")
        self._child: subprocess.Popen | None = None

    def stop(self, _signum: int, _frame=None) -> None:
        """Signal handler: stop vLLM (SIGTERM, whichever stop signal came), and stop restarting it."""
        if not self.stopping.is_set():
            self._stop_deadline = time.monotonic() + self.grace_s
            self.stopping.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        restarts: deque[float] = deque()
        while True:
            code = self._run_once()
            if self.stopping.is_set():
                return 0
            now = time.monotonic()
            restarts.append(now)
            while restarts and restarts[0] < now - self.window_s:
                restarts.popleft()
            if len(restarts) > self.max_restarts:
                logger.error(
                    "vLLM exited (%s) %d times within %.0f s: giving up; the service's liveness now fails",
                    code, len(restarts), self.window_s,
                )  # fmt: skip
                return 1
            delay = min(self.first_delay_s * 2 ** (len(restarts) - 1), _MAX_DELAY_S)
            logger.warning(
                "vLLM exited (%s) without being asked to; starting it again in %.0f s (restart %d of at most %d "
                "within %.0f s)", code, delay, len(restarts), self.max_restarts, self.window_s,
            )  # fmt: skip
            if self.stopping.wait(delay):
                return 0

    def _run_once(self) -> int:
        child = subprocess.Popen(self.command, start_new_session=True)
        self._child = child
        if self.stopping.is_set():  # a signal came between the check and the start
            child.send_signal(signal.SIGTERM)
        try:
            while True:
                try:
                    return child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if time.monotonic() > self._stop_deadline:
                        logger.warning("vLLM did not stop within %.0f s; killing it", self.grace_s)
                        _kill_session(child.pid)
        finally:
            _kill_session(child.pid)  # what outlived the API server (engine core, workers)
            self._child = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-restarts", type=int, default=5)
    parser.add_argument("--window", type=float, default=600.0, help="seconds over which restarts are counted")
    parser.add_argument("--grace", type=float, default=27.0, help="seconds vLLM gets to stop when asked")
    parser.add_argument("--first-delay", type=float, default=1.0, help="seconds before the first restart (doubling)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the vLLM server's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    supervisor = Supervisor(
        command,
        max_restarts=args.max_restarts,
        window_s=args.window,
        grace_s=args.grace,
        first_delay_s=args.first_delay,
    )
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
