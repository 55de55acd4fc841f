"""Rollouts on vLLM servers (``rollout.engine: vllm``), one job per module:

- :mod:`.environment`: the engine's interpreter and PYTHONPATH overlay, the process environment of a server,
  and the checks that run before any process group exists (engine installed, URL reachable, head size);
- :mod:`.servers`: starting and stopping local servers (127.0.0.1, free ports, /health, SIGTERM, logs);
- :mod:`.client`: token-id prompts in, tokens and per-token sampler log-probs out, spread over the servers,
  a failed server's prompts retried on another; pause / reload_weights / resume;
- :mod:`.sync`: the weight push (Megatron-Bridge export on every trainer rank, one rank writes and posts);
- :mod:`.link`: the trainer's typed link to the engine: requests in flight in a thread, versions, checkpoints.
"""
