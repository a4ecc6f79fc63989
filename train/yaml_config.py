"""YAML configs into typed dataclasses: ``_base_`` inheritance, ``key.sub=value`` overrides, and construction that
refuses unknown keys and wrong types, naming the field (``train/config.py`` defines the sections)."""

import dataclasses
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


def build_dataclass(cls, values: dict[str, Any], where: str):
    """Builds dataclass ``cls`` from a dict, refusing unknown keys and converting nested sections."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value or {}, key)
        elif get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):
            kwargs[name] = [build_dataclass(get_args(hint)[0], v, f"{key}[{i}]") for i, v in enumerate(value or [])]
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    if get_origin(hint) is list and get_args(hint)[0] in (int, str):
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list of {'integers' if item is int else 'strings'}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if get_origin(hint) is tuple:
        items = get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ValueError(f"{key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    return value


def load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"_base_ cycle through {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: malformed YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of sections, not a {type(data).__name__}")
    base = data.pop("_base_", None)
    if base:
        data = _merge(load_yaml(path.parent / base, (*seen, path)), data)
    return data


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b=value`` strings (value parsed as YAML; ``a.b=`` is the empty string) to a nested dict;
    ``tasks.0.weight=2`` indexes lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        *path, last = key.split(".")
        node: Any = data
        for depth, part in enumerate([*path, last]):
            where = ".".join(key.split(".")[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"{where}: no list item {part!r} (the list has {len(node)})")
                part = int(part)
            elif not isinstance(node, dict):
                raise ValueError(f"{where}: {'.'.join(key.split('.')[:depth])} is a value, not a section")
            if depth == len(path):
                try:
                    node[part] = yaml.safe_load(raw) if raw.strip() else ""  # `run.freeze=` clears a string field
                except yaml.YAMLError as exc:
                    raise ValueError(f"override {item!r}: malformed YAML value: {' '.join(str(exc).split())}") from None
            else:
                node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    return data
