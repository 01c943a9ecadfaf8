"""The LLM service's supervisor over stand-in commands (small Python scripts): vLLM started again when it dies,
stopped when asked, given up on in a crash loop, and nothing of it left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hcxserve.config import load_track
from hcxserve.llm.args import supervised_command


def supervise(script: str, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "hcxserve.llm.supervisor", "--first-delay", "0.05", *options, "--",
               sys.executable, "-c", script]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def starts(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_server_that_dies_is_started_again(tmp_path):
    log = tmp_path / "starts"
    # dies twice, then serves until stopped
    script = (
        "import pathlib, time\n"
        f"log = pathlib.Path({str(log)!r})\n"
        "log.write_text((log.read_text() if log.exists() else '') + 'started\\n')\n"
        "if len(log.read_text().splitlines()) < 3: raise SystemExit(3)\n"
        "time.sleep(60)"
    )
    supervisor = supervise(script)
    wait_for(lambda: starts(log) == 3)
    time.sleep(0.3)
    assert supervisor.poll() is None and starts(log) == 3
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(10) == 0
    stderr = supervisor.stderr.read()
    assert stderr.count("without being asked to; starting it again") == 2 and "ERROR" not in stderr


def test_a_crash_loop_is_given_up_on(tmp_path):
    supervisor = supervise("raise SystemExit(1)", "--max-restarts", "2", "--window", "60")
    assert supervisor.wait(10) == 1
    stderr = supervisor.stderr.read()
    assert stderr.count("starting it again") == 2 and "exited (1) 3 times within 60 s: giving up" in stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_the_server_with_sigterm_and_nothing_restarts(tmp_path, signum):
    marker = tmp_path / "stopped"
    script = (
        "import signal, sys, time, pathlib\n"
        f"def stop(n, f): pathlib.Path({str(marker)!r}).write_text(str(n)); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop); signal.signal(signal.SIGINT, stop)\n"
        "print('up', flush=True); time.sleep(60)"
    )
    supervisor = supervise(script)
    wait_for(lambda: len(psutil.Process(supervisor.pid).children()) == 1)
    time.sleep(0.3)  # the stand-in has installed its handlers
    supervisor.send_signal(signum)
    assert supervisor.wait(10) == 0
    assert marker.read_text() == str(int(signal.SIGTERM))  # vLLM's clean stop, Ctrl-C included
    assert "starting it again" not in supervisor.stderr.read()


def test_what_outlives_the_server_is_killed_and_a_stuck_server_is_killed_after_the_grace(tmp_path):
    pids = tmp_path / "pids"
    # a child that outlives it (an engine process), and a server that ignores SIGTERM
    script = (
        "import os, signal, subprocess, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "engine = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(pids)!r}).write_text(f'{{os.getpid()}} {{engine.pid}}')\n"
        "time.sleep(60)"
    )
    supervisor = supervise(script, "--grace", "1")
    wait_for(pids.exists)
    wait_for(lambda: len(pids.read_text().split()) == 2)
    server, engine = (psutil.Process(int(pid)) for pid in pids.read_text().split())
    started = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(10) == 0
    assert 1 <= time.monotonic() - started < 5
    psutil.wait_procs([server, engine], timeout=5)
    assert not server.is_running() and not engine.is_running()


def test_the_llm_service_runs_vllm_under_the_supervisor():
    track = load_track("b", profile="embedded")
    command = supervised_command(track)
    assert command[1:3] == ["-m", "hcxserve.llm.supervisor"]
    split = command.index("--")
    options = dict(zip(command[3:split:2], command[4:split:2]))
    assert options == {"--max-restarts": "5", "--window": "600.0", "--grace": "27"}
    assert command[split + 1 : split + 4] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
