"""``vlmtune list``: methods (their options, or a JSON schema of them), datasets, backbones, text backends."""

from __future__ import annotations

import argparse

from vlmtune.cli.common import Command
from vlmtune.errors import VlmtuneError


def add(command: Command) -> None:
    p = command("list", help="list methods (and their options), datasets, backbones and text-generation backends")
    p.add_argument("what", nargs="?", choices=("all", "methods", "datasets", "backbones", "textgen"), default="all")
    p.add_argument("--options", action="store_true", help="each method's options: type, default, range and doc")
    p.add_argument(
        "--schema",
        action="store_true",
        help="methods: a JSON schema of every method's options (for editors completing config files)",
    )
    p.set_defaults(fn=execute)


def execute(args: argparse.Namespace) -> int:
    from vlmtune.backbones import EXAMPLE_SPECS
    from vlmtune.data import list_datasets
    from vlmtune.methods.options import describe
    from vlmtune.methods.registry import list_methods

    what = args.what
    if args.schema:
        import json

        from vlmtune.methods.options import options_schema

        if what not in ("all", "methods"):
            raise VlmtuneError("--schema describes the methods' options: vlmtune list methods --schema")
        print(json.dumps(options_schema(list_methods()), indent=1))
        return 0
    if what in ("all", "methods"):
        print("methods:")
        for m in list_methods():
            print(f"  {m.name:<16} [{m.capability.value}] {m.summary}")
            if args.options:
                for o in describe(m.config_cls):
                    limits = f" ({o.constraints})" if o.constraints else ""
                    print(f"      {o.name:<14} {o.type:<28} default {o.default!r}{limits}: {o.doc}")
                if m.presets:
                    print(f"      presets (--set preset=NAME): {', '.join(m.presets)}")
        if not args.options:
            print("  (each method's options: vlmtune list methods --options)")
    if what in ("all", "datasets"):
        print("datasets:")
        for d in list_datasets():
            print(f"  {d.name:<20} {d.description}")
        print("  folder:<path>        any <root>/<class>/<image> folder")
    if what in ("all", "backbones"):
        print("backbones (spec grammar: toy | openclip:<arch>[@<tag or file>] | hf:<repo or folder> | local:<folder>):")
        for spec in EXAMPLE_SPECS:
            print(f"  {spec}")
    if what in ("all", "textgen"):
        print("text-generation backends (vlmtune textgen --backend B --model M; docs/textgen.md):")
        print("  toy            the bundled toy describer (offline, default)")
        print("  openai         any OpenAI-compatible endpoint (--endpoint URL): vLLM, ollama, llama.cpp, hosted APIs")
        print("  transformers   a local LLaVA-style image-text-to-text model or text LLM (hub id or folder)")
    return 0
