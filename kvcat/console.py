"""The command line's shared pieces: one console, one way to fail, and commands built from config dataclasses.

A config dataclass is the one place a default lives: `config_command` turns its fields into the command's
options (default and help from the field), so a CLI can never drift from the `run(config)` it calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print a one-line error (no traceback) and exit: for bad input a user can fix. The message is plain text:
    rich would take a bracketed word in it (pip install '.[deploy]') for markup and drop it."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def option(default=dataclasses.MISSING, *, help: str, flags: tuple[str, ...] = (), **kwargs):
    """A dataclass field that is also a CLI option: `help` (and optional extra `flags`) live in its metadata."""
    meta = {"help": help, "flags": flags}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def _sequence_of(annotation) -> tuple[type, type] | None:
    """(list or tuple, item type) for list[X] / tuple[X, ...] (given on the command line as 'a,b,c'), else None."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return origin, (args[0] if args else str)
    return None


def _optional(annotation):
    """X for `X | None`, else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def split_list(text: str, item: type = str) -> list:
    """'8,16' -> [8.0, 16.0] for item float; a clear error for a bad item."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(item(part))
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not a {item.__name__}") from None
    return out


def config_command(config_cls: type, run: Callable, *, skip: tuple[str, ...] = (), doc: str | None = None,
                   **extra: inspect.Parameter) -> Callable:
    """A typer command whose options are `config_cls`'s fields; it calls `run(config_cls(...), **extra_values)`.

    Lists are given comma-separated ('8,16'); `skip` leaves fields at their dataclass default; `extra` adds
    options that are not config fields (e.g. `resume`), passed to `run` as keyword arguments."""
    hints = typing.get_type_hints(config_cls)
    params, lists = [], {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.init:
            continue
        annotation = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        base = _optional(annotation) or annotation
        sequence = _sequence_of(base)
        if sequence is not None:
            lists[f.name] = sequence
            annotation = str | None if default is None else str
            if default is not None and default is not ...:
                default = ",".join(format(x, "g") if isinstance(x, float) else str(x) for x in default)
        elif base is Path:
            annotation = Path | None if default is None else Path
        flags = (f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ()))
        info = typer.Option(default, *flags, help=f.metadata.get("help"), show_default=default is not None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=annotation))
    names = {p.name for p in params}
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra.values()]

    def command(**values):
        config_values = {k: v for k, v in values.items() if k in names}
        for name, (kind, item) in lists.items():
            if isinstance(config_values.get(name), str):
                config_values[name] = kind(split_list(config_values[name], item))
        try:
            config = config_cls(**config_values)
        except (TypeError, ValueError) as exc:
            fail(str(exc))
        return run(config, **{k: v for k, v in values.items() if k not in names})

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc or run.__doc__ or config_cls.__doc__
    command.__name__ = getattr(run, "__name__", "command")
    return command
