"""Compaction methods by name, for the CLI (`kvcat compact --method`), the server, `kvcat eval` and the benchmarks.

    method = get_method("am-hak", max_queries=1024)    # parameters checked: unknown names, types, choices, ranges
    method = method_from_spec("am-hak:max_queries=1024")  # the same, as the benchmarks' --methods take it

`register` adds a method class under its `name`; registering the same class again does nothing (a plugin may
load in several processes). The built-in methods register when `kvcat.compaction` is imported.
"""

from __future__ import annotations

import json
from typing import Any

from .base import CompactionError, Method, parameters

METHODS: dict[str, type[Method]] = {}
ALIASES = {"truncation": "recent", "streamingllm": "streaming-llm", "knorm": "key-norm", "am": "am-hak",
           "omp": "am-omp", "cartridges": "optimize"}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator (above @dataclass): add a method to the registry under `cls.name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name`")
    if "__dataclass_fields__" not in vars(cls):
        raise TypeError(f"{cls.__name__} must be a @dataclass: its fields are its parameters")
    if METHODS.get(cls.name, cls) is not cls:
        raise TypeError(f"method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The class registered under `name` (or one of its ALIASES); CompactionError for unknown names."""
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise CompactionError(f"unknown compaction method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str, **params: Any) -> Method:
    """A registered method with `params` (from code, `--param` or an HTTP body); CompactionError naming an
    unknown or bad parameter."""
    cls = method_class(name)
    known = [f.name for f in parameters(cls)]
    unknown = set(params) - set(known)
    if unknown:
        raise CompactionError(f"method {cls.name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                              f"it takes: {', '.join(sorted(known)) or 'none'}")
    return cls(**params)


def parse_params(items: list[str]) -> dict[str, Any]:
    """["key=value", ...] -> parameters; each value read as JSON where it parses (numbers, true, lists), else
    as a string. ValueError for an item without "="."""
    params = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"a method parameter is key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            params[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = raw
    return params


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"name" or "name:key=value:key=value" -> (name, parameters), as `/v1/compact` takes them."""
    name, *items = spec.split(":")
    return name, parse_params(items)


def method_from_spec(spec: str) -> Method:
    """A method from "name" or "name:key=value:key=value" (a variant under test, named by its spec)."""
    name, params = parse_spec(spec)
    return get_method(name, **params)


def method_names() -> list[str]:
    return sorted(METHODS)
