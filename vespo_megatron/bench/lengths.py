"""Sequence-length distributions for ``bench step --lengths DIST``: a spec string -> a tensor of lengths.

Syntax (lengths are whole sequences, prompt + response tokens):

* ``lognormal:median=200,sigma=1.0,min=16,max=2048`` (or ``mean=`` instead of ``median=``): a log-normal
  draw, clipped to ``[min, max]``; ``sigma`` defaults to 1.0 and ``min`` to 16, ``max`` is required;
* ``uniform:min=16,max=2048``: uniform integers in ``[min, max]``;
* a path to a JSONL file: one length per line, either a bare integer or an object with ``"length"``
  (taken in order, repeated when more sequences are needed).
"""

from __future__ import annotations

import json
import math
import os

import torch

SYNTAX = ("lognormal:median=M|mean=M[,sigma=S][,min=A],max=B | uniform:min=A,max=B | "
          "FILE.jsonl (one length per line: N or {\"length\": N})")


def _fields(spec: str, allowed: set[str]) -> dict[str, float]:
    fields = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"--lengths: {item!r} is not one of {sorted(allowed)} as key=value; syntax: {SYNTAX}")
        fields[key] = float(value)
    return fields


def _from_jsonl(path: str, count: int) -> torch.Tensor:
    with open(path) as handle:
        lines = [line for line in handle if line.strip()]
    values = []
    for number, line in enumerate(lines, 1):
        item = json.loads(line)
        value = item.get("length") if isinstance(item, dict) else item
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"--lengths {path}:{number}: {line.strip()!r} is not a length >= 2 (N or {{\"length\": N}})")
        values.append(value)
    if not values:
        raise ValueError(f"--lengths {path} holds no lengths")
    return torch.tensor([values[i % len(values)] for i in range(count)])


def draw_lengths(spec: str, count: int, seed: int) -> torch.Tensor:
    """``count`` sequence lengths (long) from ``spec`` (see the module docstring), reproducible by ``seed``."""
    kind, _, rest = spec.partition(":")
    gen = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        fields = _fields(rest, {"median", "mean", "sigma", "min", "max"})
        sigma, low = fields.get("sigma", 1.0), fields.get("min", 16)
        if "max" not in fields or ("median" in fields) == ("mean" in fields):
            raise ValueError(f"--lengths lognormal needs max and exactly one of median, mean; syntax: {SYNTAX}")
        mu = math.log(fields["median"]) if "median" in fields else math.log(fields["mean"]) - sigma**2 / 2
        drawn = torch.exp(mu + sigma * torch.randn(count, generator=gen, dtype=torch.float64))
        return drawn.round().clamp(low, fields["max"]).long()
    if kind == "uniform":
        fields = _fields(rest, {"min", "max"})
        if "min" not in fields or "max" not in fields or fields["min"] > fields["max"]:
            raise ValueError(f"--lengths uniform needs min <= max; syntax: {SYNTAX}")
        return torch.randint(int(fields["min"]), int(fields["max"]) + 1, (count,), generator=gen)
    if os.path.exists(spec):
        return _from_jsonl(spec, count)
    raise ValueError(f"--lengths {spec!r} is neither a distribution nor an existing file; syntax: {SYNTAX}")
