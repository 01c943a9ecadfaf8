"""Running servers as child process trees, for the end-to-end tests and the benchmarks: a served bento (with its
LLM components on known ports), or any command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from hcxserve.config import PROJECT_ROOT, TRACKS

SHUTDOWN_GRACE_S = 30  # as scripts/serve.sh: how long running requests get to finish on SIGTERM


def nvidia_gpu_count() -> int:
    """GPUs the NVIDIA driver reports (NVML, which BentoML's allocator reads too); 0 where there is no driver."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver (libnvidia-ml) on this machine
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def serve_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Environment for a served bento in tests and benchmarks. BentoML's GPU allocation stays on where GPUs exist,
    so placement is what production gets; without any it is turned off (it would hand out device indices that do
    not exist)."""
    env = {**(os.environ if base is None else base), "BENTOML_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", **extra}
    if nvidia_gpu_count() == 0:
        env["BENTOML_DISABLE_GPU_ALLOCATION"] = "1"
    return env


def config_env(overrides: dict[str, Any]) -> dict[str, str]:
    """Environment variables (pydantic-settings' names) for dotted config overrides that name their track or the
    deployment: `{"a.llm.port": 8011}` -> `{"HCX_TRACKS__A__LLM__PORT": "8011"}`."""
    env = {}
    for dotted, value in overrides.items():
        path = dotted.split(".")
        if path[0] in TRACKS:
            path = ["tracks", *path]
        text = value if isinstance(value, str) else json.dumps(value)
        env["HCX_" + "__".join(part.upper() for part in path)] = text
    return env


def serve_bento(
    target: str,
    log_path: Path,
    *,
    tracks: Sequence[str],
    overrides: dict[str, Any] | None = None,
    api_key: str | None = None,
) -> ServedProcess:
    """`bentoml serve target` on free ports; each track's LLM component (its own vLLM server) listens on a free
    port too, at `llm_urls[track]`, for tests and benchmarks that talk to it directly. With `api_key`, the gateway
    requires it (`headers` carries it)."""
    port, llm_ports = free_port(), {track: free_port() for track in tracks}
    overrides = {**{f"{t}.llm.port": p for t, p in llm_ports.items()}, **(overrides or {})}
    if api_key is not None:
        overrides["auth.api_keys"] = api_key
    # a home of its own: every `bentoml serve` empties its home's Prometheus multiprocess folder at start, so a second
    # bento on the machine (a benchmark beside the tests) would otherwise wipe this one's metrics
    home = log_path.parent / f"{log_path.stem}.bentoml_home"
    home.mkdir(parents=True, exist_ok=True)
    env = serve_env(**config_env(overrides), BENTOML_HOME=str(home))
    server = ServedProcess(
        [
            str(Path(sys.executable).parent / "bentoml"),
            "serve",
            target,
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            str(SHUTDOWN_GRACE_S),
        ],  # fmt: skip
        env,
        log_path,
        url=f"http://127.0.0.1:{port}",
    )
    server.llm_urls = {track: f"http://127.0.0.1:{p}" for track, p in llm_ports.items()}
    server.headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    return server


# what the tests' S3-compatible store accepts (moto takes any credentials; these are never real)
S3_ACCESS_KEY, S3_SECRET_KEY, S3_REGION = "AKIDTESTTESTTESTTEST", "test-secret-do-not-log-0123456789", "us-east-1"
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def serve_s3(log_path: Path, buckets: Sequence[str] = ("media",), timeout: float = 30) -> ServedProcess:
    """moto's standalone S3 server (a real HTTP server, in its own process) on 127.0.0.1, with `buckets` made;
    stop it with `stop()`. Its `storage` maps the gateway's storage settings onto it (dotted config overrides)."""
    import boto3

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
    server = ServedProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env, log_path,
                           url=f"http://127.0.0.1:{port}")  # fmt: skip
    try:
        server.wait_ready(f"{server.url}/moto-api/", timeout)
        client = boto3.session.Session(
            aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY, region_name=S3_REGION
        ).client("s3", endpoint_url=server.url)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
    except BaseException:
        server.stop()
        raise
    server.storage = {
        "gateway.storage.backend": "s3", "gateway.storage.endpoint_url": server.url,
        "gateway.storage.bucket": buckets[0], "gateway.storage.region": S3_REGION,
        "gateway.storage.access_key_id": S3_ACCESS_KEY, "gateway.storage.secret_access_key": S3_SECRET_KEY,
    }  # fmt: skip
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedProcess:
    """A server started with its output in `log_path`; `stop()` ends its whole process tree."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, *, url: str = "") -> None:
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ready_after_s: float | None = None
        self.llm_urls: dict[str, str] = {}
        self.headers: dict[str, str] = {}
        self.storage: dict[str, Any] = {}

    def wait_ready(self, url: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    self.ready_after_s = time.monotonic() - self.started
                    return self.ready_after_s
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout}s; log tail:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def rss_by_process(self) -> dict[str, float]:
        """RSS in MB of every process of the tree, keyed by what it is."""
        out: dict[str, float] = {}
        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                name, cmd = p.name(), " ".join(p.cmdline())
                if "--service-name" in cmd:
                    name = "bentoml worker " + cmd.split("--service-name")[1].split()[0]
                elif "hcxserve.llm.supervisor" in cmd:
                    name = "vLLM supervisor"
                elif "vllm.entrypoints" in cmd:
                    name = "vLLM API server"
                key, n = name, 2
                while key in out:
                    key, n = f"{name} #{n}", n + 1
                out[key] = p.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the root, then whatever of its tree is still alive. BentoML's circus and its workers run in
        their own process groups, so signalling the group of `bentoml serve` alone can leave workers behind."""
        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        if tree:
            tree[0].terminate()
            _, alive = psutil.wait_procs(tree[:1], timeout=timeout)
            for p in [*alive, *tree[1:]]:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            for p in psutil.wait_procs(tree, timeout=10)[1]:
                p.kill()
        self.proc.wait()
        self._log.close()
