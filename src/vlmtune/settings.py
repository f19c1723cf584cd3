"""``ExecSettings``: how a run executes (device, data, precisions, text generation), declared once.

``RunConfig``, the protocols' ``ProtocolSettings`` and ``reproduce``'s ``RunSettings`` inherit these fields, and the
command line generates one flag per field (``cli.common.add_exec_flags``), so every command offers every setting.
``parse_settings`` validates a mapping (a config file, a run directory's ``config.json``) strictly: unknown keys and
wrong types are one-line errors with a did-you-mean.

This module imports neither torch nor any model code (``vlmtune --help`` reads it).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from vlmtune.errors import VlmtuneError, did_you_mean

Precision = Literal["fp32", "bf16", "auto"]
PRECISION_HELP = "fp32 (default), bf16 (a bfloat16 copy: 2.5-5x faster on AMX CPUs) or auto (bf16 where the device "
PRECISION_HELP += "has bf16 matrix units)"


def setting(default: Any, help: str, flag: str | None = None) -> Any:
    """A settings field with its CLI help (``flag``: the option name when it is not ``--<name>``)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True, kw_only=True)
class ExecSettings:
    """How a run executes; none of these change what a method learns, only where and how fast.

    Attributes:
        device: torch device for the backbone (``auto`` = cuda / mps / cpu).
        data_root: folder holding the real datasets (None = ``$VLMTUNE_DATA`` or ``./data``).
        skip_corrupt: drop unreadable images (each logged) instead of failing on the first one.
        box_precision: weights of the local black box a black-box method queries (``fp32``; ``bf16``: a bfloat16
            copy, about 2.5x faster on AMX CPUs; ``auto``: bf16 where the device has bf16 matrix units).
        feature_precision: weights of the image tower that extracts the other methods' features (same names;
            part of the feature-cache keys through the weights' fingerprint).
        textgen: the text-generation backend of methods that use LLM / LMM texts (``toy``, ``openai``,
            ``transformers``; ``vlmtune.textgen``); texts come from the cache when they are there.
        textgen_model: its model (None = the backend's default: the bundled toy describer for ``toy``).
        textgen_endpoint: the ``openai`` backend's URL (None = ``$VLMTUNE_TEXTGEN_ENDPOINT`` or localhost:8000).
    """

    device: str = setting("cpu", "cpu, cuda, cuda:N, mps or auto (default: cpu)")
    data_root: str | None = setting(None, "folder with the real datasets (default: $VLMTUNE_DATA or ./data)")
    skip_corrupt: bool = setting(False, "skip unreadable images (logged) instead of failing")
    box_precision: Precision = setting("fp32", "weights of the local black box of black-box methods: " + PRECISION_HELP)
    feature_precision: Precision = setting("fp32", "weights of the tower that extracts features: " + PRECISION_HELP)
    textgen: str = setting(
        "toy",
        "text generation: toy (bundled, offline; default), openai (an OpenAI-compatible endpoint) or transformers "
        "(a local LLaVA-style model)",
        flag="--textgen-backend",
    )
    textgen_model: str | None = setting(
        None, "the generator's model (openai: the served model name; transformers: hub id or folder)"
    )
    textgen_endpoint: str | None = setting(
        None,
        "openai backend: base URL (default $VLMTUNE_TEXTGEN_ENDPOINT or http://localhost:8000/v1; API key from "
        "$VLMTUNE_TEXTGEN_API_KEY or $OPENAI_API_KEY)",
    )


EXEC_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ExecSettings))


def exec_of(settings: ExecSettings) -> dict[str, Any]:
    """The execution settings of any object that inherits them (to hand on: ``RunConfig(**exec_of(ps), ...)``)."""
    return {name: getattr(settings, name) for name in EXEC_FIELDS}


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or nothing."""
    close = did_you_mean(name, list(known))
    return f" (did you mean {close[0]!r}?)" if close else ""


T = TypeVar("T")


def parse_settings(cls: type[T], data: Mapping[str, Any], what: str = "config", ignore: Iterable[str] = ()) -> T:
    """``cls(**data)`` checked strictly: an unknown key or a wrong type is a ``VlmtuneError`` naming the key.

    ``ignore``: keys the file may hold that are not settings (a run directory's ``method_config``).
    """
    import pydantic

    if not isinstance(data, Mapping):
        raise VlmtuneError(f"{what}: expected a mapping of settings, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    skip = set(ignore)
    for key in data:
        if key not in names and key not in skip:
            raise VlmtuneError(f"{what}: unknown setting {key!r}{suggest(str(key), names)}")
    values = {k: v for k, v in data.items() if k in names}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        try:
            pydantic.TypeAdapter(hints[key]).validate_python(value, strict=True)
        except pydantic.ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise VlmtuneError(f"{what}: {key}: {msg[0].lower()}{msg[1:]}, got {value!r}") from None
    return cls(**values)
