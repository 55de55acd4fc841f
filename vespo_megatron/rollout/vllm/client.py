"""HTTP client of the vLLM servers: token-id prompts in, tokens and per-token sampler log-probs out.

Every response row is one request with its own seed (``/v1/completions`` with a token-id prompt,
``return_token_ids`` and ``logprobs=0``), so a row samples the same tokens whichever server serves it. Rows
are spread round-robin over the servers that are alive; a server that fails a request (connection refused,
timeout, HTTP 5xx) is marked failed for the rest of the run and its rows are retried on the others; with
none left the call raises naming every failed server and its error. The control endpoints (pause,
collective_rpc reload_weights, resume) are posted to every live server.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

MODEL_NAME = "policy"
"""The name local servers serve the model under (``--served-model-name``); URL servers may use any name."""


class ServerFailed(RuntimeError):
    """A server did not answer a request (connection, timeout or HTTP 5xx): its work goes elsewhere."""


class NoServerLeft(RuntimeError):
    """Every server has failed; the message names each with its error."""


@dataclass(frozen=True)
class SamplingSettings:
    """What every request of a step asks for."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    allowed_vocab: Optional[int] = None
    """Sample only ids below this (the tokenizer's vocabulary when the model's is larger, as the Megatron
    decoders do); the log-probs are then those of the renormalised distribution. None: the whole vocabulary."""


@dataclass(frozen=True)
class Completion:
    """One sampled response: its tokens and the sampler's log-prob of each, and the server that made it."""

    tokens: list[int]
    logprobs: list[float]
    server: str


def _post(url: str, payload: Optional[dict], timeout_s: float) -> dict:
    data = json.dumps(payload if payload is not None else {}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            body = reply.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        if error.code >= 500:
            raise ServerFailed(f"HTTP {error.code}: {detail}") from None
        raise RuntimeError(f"{url} refused the request with HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
        raise ServerFailed(str(getattr(error, "reason", error))) from None
    return json.loads(body) if body.strip() else {}


def parse_completion(reply: dict, server: str) -> Completion:
    """Tokens and log-probs of a ``/v1/completions`` reply for one prompt."""
    choice = reply["choices"][0]
    tokens = choice.get("token_ids")
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if tokens is None or logprobs is None or len(tokens) != len(logprobs):
        raise RuntimeError(f"vLLM server {server} returned no token ids or log-probs (token_ids={tokens!r}); "
                           "it must support return_token_ids and logprobs (vLLM >= 0.11)")
    return Completion(tokens=[int(t) for t in tokens], logprobs=[float(x) for x in logprobs], server=server)


class VllmClient:
    """Requests to a fixed list of servers, with failover."""

    def __init__(self, urls: Sequence[str], timeout_s: float = 600.0, model: str = MODEL_NAME,
                 max_parallel: int = 64):
        if not urls:
            raise ValueError("VllmClient needs at least one server URL")
        self.urls = [url.rstrip("/") for url in urls]
        self.timeout_s, self.model, self.max_parallel = timeout_s, model, max_parallel
        self.failed: dict[str, str] = {}
        """Server URL -> the error that took it out of service."""
        self._lock = threading.Lock()

    @property
    def alive(self) -> list[str]:
        """The servers not marked failed, in their given order."""
        with self._lock:
            return [url for url in self.urls if url not in self.failed]

    def _mark_failed(self, url: str, error: str) -> None:
        with self._lock:
            self.failed.setdefault(url, error)

    def _no_server_left(self, what: str) -> NoServerLeft:
        named = "; ".join(f"{url}: {error}" for url, error in self.failed.items())
        return NoServerLeft(f"no vLLM server left for {what}: every server failed ({named}); check its log "
                            "(RUN_DIR/vllm/) or restart it")

    def _with_failover(self, first: int, path: str, payload: dict, what: str) -> tuple[dict, str]:
        """POST ``payload`` to the ``first``-th live server, then to each other live one until one answers."""
        while True:
            alive = self.alive
            if not alive:
                raise self._no_server_left(what)
            url = alive[first % len(alive)]
            try:
                return _post(url + path, payload, self.timeout_s), url
            except ServerFailed as error:
                self._mark_failed(url, str(error))

    def complete(self, prompt: list[int], settings: SamplingSettings, seed: int, slot: int = 0) -> Completion:
        """One response to ``prompt`` sampled with ``seed``; ``slot`` picks the server (round-robin)."""
        payload = {
            "model": self.model, "prompt": prompt, "max_tokens": settings.max_tokens,
            "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k or -1,
            "seed": seed, "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True,
            "stop_token_ids": list(settings.stop_token_ids), "ignore_eos": True, "skip_special_tokens": False,
        }
        if settings.allowed_vocab is not None:
            payload["allowed_token_ids"] = list(range(settings.allowed_vocab))
        reply, url = self._with_failover(slot, "/v1/completions", payload, f"prompt row {slot}")
        return parse_completion(reply, url)

    def complete_all(self, prompts: Sequence[list[int]], settings: SamplingSettings,
                     seeds: Sequence[int]) -> list[Completion]:
        """One response per prompt (row ``i`` with ``seeds[i]``), the rows spread over the servers at once."""
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(len(prompts), self.max_parallel)) as pool:
            futures = [pool.submit(self.complete, prompt, settings, seed, row)
                       for row, (prompt, seed) in enumerate(zip(prompts, seeds))]
            return [future.result() for future in futures]

    def prompt_logprobs(self, tokens: list[int]) -> tuple[list[float], str]:
        """The served weights' log-prob of each of ``tokens[1:]`` given the tokens before it (teacher forced)."""
        payload = {"model": self.model, "prompt": tokens, "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True}
        reply, url = self._with_failover(0, "/v1/completions", payload, "prompt log-probs")
        entries = reply["choices"][0]["prompt_logprobs"][1:]
        values = []
        for token, entry in zip(tokens[1:], entries):
            chosen = entry.get(str(token)) or entry.get(f"token_id:{token}")
            if chosen is None:
                raise RuntimeError(f"vLLM server {url} returned no prompt log-prob for token {token}")
            values.append(float(chosen["logprob"]))
        return values, url

    def post_all(self, path: str, payload: Optional[dict] = None) -> list[str]:
        """POST to every live server (a failing one is marked failed); returns the servers that answered."""
        answered = []
        for url in self.alive:
            try:
                _post(url + path, payload, self.timeout_s)
                answered.append(url)
            except ServerFailed as error:
                self._mark_failed(url, str(error))
        if not answered:
            raise self._no_server_left(path)
        return answered

    def reload_weights(self, weights_dir: str) -> list[str]:
        """Pause generation, load the safetensors in ``weights_dir``, resume: on every live server."""
        self.post_all("/pause")
        try:
            return self.post_all("/collective_rpc", {"method": "reload_weights",
                                                     "kwargs": {"weights_path": str(weights_dir)}})
        finally:
            self.post_all("/resume")
