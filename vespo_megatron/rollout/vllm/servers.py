"""Local vLLM servers: started on 127.0.0.1 at free ports, polled on /health, stopped with SIGTERM.

Each server is ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` does not run from the CPU
package) over the HF folder ``model.hf_path``, without a tokenizer (token-id prompts), with the pause /
reload / resume endpoints (VLLM_SERVER_DEV_MODE) and log-probs of the distribution it samples from
(``--logprobs-mode processed_logprobs``: after temperature). Its output goes to ``RUN_DIR/vllm/server_I.log``.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

from vespo_megatron.config.rl import VllmConfig
from vespo_megatron.rollout.vllm.environment import engine_python, server_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(settings: VllmConfig, model_dir: str, port: int, max_model_len: int) -> list[str]:
    """The command line of one local server."""
    command = [
        engine_python(settings), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--enforce-eager",
        "--dtype", settings.dtype, "--max-model-len", str(max_model_len),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--max-num-seqs", str(settings.max_num_seqs), "--logprobs-mode", "processed_logprobs",
        "--served-model-name", "policy",
    ]
    if settings.device == "cpu":
        command += ["--kv-cache-memory-bytes", str(settings.kv_cache_bytes)]
    return command + list(settings.extra_args)


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``url``/health answers HTTP 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class LocalServer:
    """One started server: its process, address and log file."""

    process: subprocess.Popen
    url: str
    log_path: Path
    log: IO[bytes]

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the API server (its engine processes exit with it); SIGKILL after ``grace_s``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@dataclass
class LocalServers:
    """The servers this process started; :meth:`stop` (also run at exit) ends every one."""

    servers: list[LocalServer] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        """``http://127.0.0.1:PORT`` of every started server, in start order."""
        return [server.url for server in self.servers]

    @classmethod
    def start(cls, settings: VllmConfig, model_dir: str, max_model_len: int, log_dir: Path) -> "LocalServers":
        """Start ``settings.servers`` servers at once and wait until all answer /health.

        A server that exits or outlasts ``rollout.vllm.startup_timeout_s`` stops them all and raises, naming
        its log file and the log's last lines.
        """
        log_dir.mkdir(parents=True, exist_ok=True)
        started = cls()
        atexit.register(started.stop)
        env = server_env(settings)
        for index in range(settings.servers):
            port = free_port()
            log_path = log_dir / f"server_{index}.log"
            log = open(log_path, "wb")
            process = subprocess.Popen(server_command(settings, model_dir, port, max_model_len), env=env,
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
            started.servers.append(LocalServer(process, f"http://127.0.0.1:{port}", log_path, log))
        try:
            started.wait_ready(settings.startup_timeout_s)
        except BaseException:
            started.stop()
            raise
        return started

    def wait_ready(self, timeout_s: float) -> None:
        """Poll every server's /health until all answer; raise naming the first that died or timed out."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.servers)
        while waiting:
            for server in list(waiting):
                code = server.process.poll()
                if code is not None:
                    raise RuntimeError(f"vLLM server {server.url} exited with code {code} while starting; "
                                       f"{server.log_path} ends with:\n{tail(server.log_path)}")
                if healthy(server.url):
                    waiting.remove(server)
            if waiting and time.monotonic() > deadline:
                server = waiting[0]
                raise TimeoutError(f"vLLM server {server.url} did not answer /health within {timeout_s:.0f} s "
                                   f"(rollout.vllm.startup_timeout_s); {server.log_path} ends with:\n"
                                   f"{tail(server.log_path)}")
            if waiting:
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        for server in self.servers:
            server.stop()


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_local_servers(settings: VllmConfig, model_dir: str, max_model_len: int,
                        run_dir: Optional[str]) -> LocalServers:
    """Start the servers of ``rollout.vllm`` with their logs in ``RUN_DIR/vllm`` (a temporary folder without one)."""
    import tempfile

    log_dir = Path(run_dir) / "vllm" if run_dir else Path(tempfile.mkdtemp(prefix="vespo-vllm-logs-"))
    return LocalServers.start(settings, model_dir, max_model_len, log_dir)
