"""The one exception every configuration check raises, and its helpers."""

from __future__ import annotations

class ConfigError(ValueError):
    """A configuration value (or combination) that cannot run; the message says how to fix it."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` (which names the key and the fix) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending (for "use one of ..." hints)."""
    return [d for d in range(1, n + 1) if n % d == 0]
