"""The one exception every configuration check raises, and its helpers."""

from __future__ import annotations

class ConfigError(ValueError):
    """A configuration value (or combination) that cannot run; the message says how to fix it."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
