"""Option groups the commands share, the execution flags generated from ``ExecSettings``, and config files.

Nothing here imports torch: building the parser (``vlmtune --help``) stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError, require
from vlmtune.settings import EXEC_FIELDS, ExecSettings, suggest

Command = Callable[..., argparse.ArgumentParser]  # the parser's ``command(name, help=...)`` factory


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> {key: value} (values stay strings; the method's config converts them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VlmtuneError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def json_or_text(value: str) -> Any:
    """``120`` -> 120, ``true`` -> True, ``gpu`` -> "gpu" (values of engine parameters)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def method_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` pairs -> {method: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_pairs(pairs).items():
        method, dot, name = key.partition(".")
        if not dot or not method or not name:
            raise VlmtuneError(f"--set expects METHOD.KEY=VALUE (e.g. coop.epochs=50), got {key!r}")
        out.setdefault(method, {})[name] = value
    return out


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def add_backbone_and_cache(p: argparse.ArgumentParser, cache: bool = True) -> None:
    p.add_argument("--backbone", default=None, help="backbone spec (default: toy; see `vlmtune list backbones`)")
    if cache:
        p.add_argument("--cache-dir", default=None, help="feature cache (default: $VLMTUNE_CACHE or ~/.cache/vlmtune)")
        p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_exec_flags(p: argparse.ArgumentParser, only: Iterable[str] = EXEC_FIELDS) -> None:
    """One flag per ``ExecSettings`` field (its help and choices from the field); unset flags read None."""
    group = p.add_argument_group("execution (ExecSettings)")
    hints = typing.get_type_hints(ExecSettings)
    wanted = set(only)
    for f in dataclasses.fields(ExecSettings):
        if f.name not in wanted:
            continue
        kind = hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata["help"]}
        if kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(kind)
        group.add_argument(_flag(f), **kw)


def exec_given(args: argparse.Namespace) -> dict[str, Any]:
    """The execution flags the user gave (to lay over a config file's and the defaults)."""
    return {name: v for name in EXEC_FIELDS if (v := getattr(args, name, None)) is not None}


def exec_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every execution setting: the flags given over the defaults."""
    return {**{f.name: f.default for f in dataclasses.fields(ExecSettings)}, **exec_given(args)}


def read_config(path: str) -> dict[str, Any]:
    """A config file as a mapping: TOML (``.toml``), YAML (``.yaml`` / ``.yml``) or JSON (anything else, such as a
    run directory's ``config.json``)."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise VlmtuneError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    try:
        if file.suffix == ".toml":
            import importlib
            import sys

            toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
            data: Any = toml.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            yaml = require("yaml", "yaml", "YAML config files")
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # each parser's own error type; the message says where
        raise VlmtuneError(f"cannot parse --config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise VlmtuneError(f"--config {path}: expected a table of settings, got {type(data).__name__}")
    return data


def apply_config(parser: argparse.ArgumentParser, config: dict[str, Any], path: str) -> None:
    """Make a config file's keys the parser's defaults, so flags given on the command line override them."""
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}
    for key, value in config.items():
        name = key.replace("-", "_")
        if name not in dests:
            raise VlmtuneError(f"--config {path}: unknown setting {key!r}{suggest(name, dests)}")
        action = dests[name]
        if action.choices is not None and value not in action.choices and not isinstance(value, list):
            raise VlmtuneError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}")
        parser.set_defaults(**{name: value})


def add_key_flags(p: argparse.ArgumentParser, state: str, budget: int, unit: str) -> None:
    """The flags of a service's keys, usage database and body limit (``vlmtune serve``, ``textgen-serve``)."""
    p.add_argument("--keys", default=None, help='keys file {"<key>": budget | null | {"queries", "work", "images"}}')
    p.add_argument("--state", default=state, help="folder of the usage database and generated keys")
    p.add_argument("--budget", type=int, default=budget, help=f"{unit} budget of the generated key (without --keys)")
    p.add_argument("--max-body-mb", type=int, default=32, help="largest request body")
    p.add_argument("--max-in-flight", type=int, default=4, help="requests of one key at a time (more: 429)")
    p.add_argument(
        "--send-timeout", type=float, default=30.0, help="seconds a reply may stall unread before the connection drops"
    )


def service_keys(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """(the keys of ``--keys``, or of a generated key file in ``--state``; the usage database's path)."""
    from vlmtune.blackbox.accounts import generate_keys, load_keys, state_paths

    keys_file, db = state_paths(args.state)
    if args.keys is not None:
        return dict(load_keys(args.keys)), db
    keys = generate_keys(keys_file, args.budget)
    print(f"API key in {keys_file} (readable by you only): {len(keys)} key(s)", flush=True)
    return dict(keys), db
