"""Running `kvcat serve` (or, as the benchmarks' baseline, vLLM's own OpenAI server) as a child process on
loopback: for the demo, the benchmarks and the tests.

    with ServerProcess("smollm2-135m") as srv:  # dtype auto: the fast one for this hardware
        client = srv.openai()
        httpx.post(srv.url("/v1/compact"), json={...})

The server is started in its own process session (vLLM spawns engine and worker processes beneath it), waited
for on its readiness route, and stopped with SIGTERM (it drains), then SIGKILL of the whole group if it hangs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the end of its log."""


PORT_CLASH = "address already in use"  # uvicorn's bind error, in the server's log
START_TRIES = 3  # a port found free can be taken before the server binds it (vLLM opens its own sockets first)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`kvcat serve` in a child process group; `StockVLLMProcess` reuses the handling for plain vLLM."""

    name = "kvcat serve"
    ready_path = "/ready"

    def __init__(self, model: str, *, dtype: str = "auto", port: int | None = None,
                 store_dir: str | os.PathLike | None = None, max_model_len: int | None = None,
                 beta: bool = True, kv_cache_gib: int | None = None, args: list[str] | tuple[str, ...] = (),
                 log_path: str | os.PathLike | None = None, env: dict | None = None,
                 ready_timeout: float = 600.0):
        self._child(port, log_path, env, ready_timeout)
        self.cmd = [sys.executable, "-m", "kvcat.cli", "serve", "--model", model, "--dtype", dtype,
                    "--host", "127.0.0.1", "--port", str(self.port), "--beta" if beta else "--no-beta"]
        # a fresh store unless told: the demo and benchmarks must not find an earlier run's contexts
        self.store_dir = Path(store_dir) if store_dir is not None else Path(tempfile.mkdtemp(prefix="kvcat-store-"))
        self.cmd += ["--store", str(self.store_dir)]
        if max_model_len is not None:
            self.cmd += ["--max-model-len", str(max_model_len)]
        if kv_cache_gib is not None:
            self.cmd += ["--kv-cache-gib", str(kv_cache_gib)]
        self.cmd += list(args)

    def _child(self, port: int | None, log_path, env: dict | None, ready_timeout: float) -> None:
        self.port_given = port is not None
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="kvcat-serve-",
                                                                              suffix=".log")[1])
        self.env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                    "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> "ServerProcess":
        """Start the child and wait until it is ready. A port this class chose that another process took in the
        meantime is replaced by a new free one, up to START_TRIES times; a port the caller gave never is."""
        for tries_left in range(START_TRIES - 1, -1, -1):
            try:
                return self._start_once()
            except ServerStartError as e:
                if self.port_given or tries_left == 0 or PORT_CLASH not in str(e) or "--port" not in self.cmd:
                    raise
            self.port = free_port()
            self.cmd[self.cmd.index("--port") + 1] = str(self.port)

    def _start_once(self) -> "ServerProcess":
        import httpx

        log = open(self.log_path, "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.name} exited with code {self.proc.returncode}; end of its log "
                                       f"({self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url(self.ready_path), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.name} not ready after {self.ready_timeout:.0f} s; end of its log "
                                       f"({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - start
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the server drains in-flight work), then SIGKILL of the process group after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the server and every engine process under it (crash tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def openai(self, api_key: str = "unused", timeout: float = 600.0):
        import openai

        return openai.OpenAI(base_url=self.url("/v1"), api_key=api_key, max_retries=0, timeout=timeout)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class StockVLLMProcess(ServerProcess):
    """vLLM's own OpenAI server (no kvcat connector, no plugin) on loopback, same engine settings: the baseline
    that serves the full document. Its routes are vLLM's; readiness is `/health`."""

    name = "vLLM's OpenAI server"
    ready_path = "/health"

    def __init__(self, model: str, *, dtype: str = "auto", port: int | None = None,
                 max_model_len: int | None = None, kv_cache_gib: int | None = None,
                 args: list[str] | tuple[str, ...] = (), log_path: str | os.PathLike | None = None,
                 ready_timeout: float = 600.0):
        from kvcat.config import choose_dtype
        from kvcat.models import resolve
        from kvcat.server.vllm_adapter.engine import EngineConfig, stock_serve_command

        name, path = resolve(model)
        # vLLM's own "auto" is the checkpoint's dtype: resolve ours so that both servers compute alike
        config = EngineConfig(model=str(path), dtype=choose_dtype(dtype, "engine").dtype, max_model_len=max_model_len,
                              kv_cache_gib=kv_cache_gib, served_name=name)
        self._child(port, log_path, None, ready_timeout)
        self.cmd, extra_env = stock_serve_command(config, "127.0.0.1", self.port)
        self.cmd += list(args)  # more of vLLM's own options
        self.env.update(extra_env)
        self.store_dir = None
