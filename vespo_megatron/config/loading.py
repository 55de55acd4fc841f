"""YAML loading, ``section.key=value`` overrides and type coercion.

Pure: nothing here reads a model file. A config naming ``model.hf_path`` gets its model shapes in a
separate step (:func:`vespo_megatron.models.hf.resolve_hf_model`; entry points call
:func:`vespo_megatron.run_config.load_run_config`, which does both).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml

from vespo_megatron.config.errors import ConfigError, require
from vespo_megatron.config.run import Config


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = get_origin(annotation)
    if origin is Optional or (origin is not None and type(None) in get_args(annotation)):
        if value is None:
            return None
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        allowed = get_args(annotation)
        require(value in allowed, f"{where}={value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(annotation):
        require(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        require(isinstance(value, bool), f"{where}={value!r} must be true or false")
        return value
    if annotation is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{where}={value!r} must be an integer")
        return value
    if annotation is float:
        # YAML 1.1 reads exponents without a dot (1e-6, 3e-4) as strings; accept them as numbers.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}={value!r} must be a number"
        )
        return float(value)
    if annotation is str:
        require(isinstance(value, (str, int, float)), f"{where}={value!r} must be a string")
        return str(value)
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    require(not unknown, f"unknown key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(names)}")
    kwargs = {key: _coerce(value, hints[key], prefix + key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None


def config_from_dict(data: dict) -> Config:
    """Build a :class:`Config` from nested plain data (unknown keys and wrong types are errors).

    ``model.hf_path`` is kept as given; the shapes it implies are filled in by
    :func:`vespo_megatron.models.hf.resolve_hf_model`.
    """
    return _build(Config, data or {}, "")


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["parallel.tp=2", "loss.name=grpo"]`` into a nested dict; values are parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        require(bool(sep) and bool(key), f"override {item!r} must look like section.key=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"override {item!r} conflicts with another override")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(
                f"override {item!r}: its value is not valid YAML ({problem}); quote it or fix it") from None
    return nested


def merge_config_data(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it, mapping by mapping (a new dict; neither input changes)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config_data(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> Any:
    """The file's YAML; a syntax error names the file, line and column instead of ``<unicode string>``."""
    try:
        with path.open(encoding="utf-8") as stream:  # a stream gives the marks the file's name
            return yaml.safe_load(stream) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"{where}: YAML syntax error ({problem}); fix the file at that line") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error ({err}); fix the file") from None


def load_config_data(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The nested plain data of a YAML config (``{}`` when ``path`` is None) with the overrides laid over it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = _read_yaml(path)
        require(isinstance(data, dict), f"{path}: the top level must be a mapping of sections")
    return merge_config_data(data, parse_overrides(overrides or []))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides.

    Reads no model files: with ``model.hf_path`` set, the model section is as written until
    :func:`vespo_megatron.run_config.load_run_config` (or ``models.hf.resolve_hf_model``) resolves it.
    """
    return config_from_dict(load_config_data(path, overrides))


def config_to_dict(config: Config) -> dict:
    """Plain nested data (for saving next to checkpoints and metrics)."""
    return dataclasses.asdict(config)
