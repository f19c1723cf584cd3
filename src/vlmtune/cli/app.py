"""The parser (each command module adds its own subparser) and ``main``: errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from vlmtune._version import __version__
from vlmtune.cli import evaluate, fit, listing, predict, protocol, reproduce, serve, textgen, tour
from vlmtune.errors import VlmtuneError

log = logging.getLogger("vlmtune")
COMMANDS = (tour, fit, evaluate, predict, serve, protocol, textgen, reproduce, listing)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something wrong (a usage error, exit 2), not a bug.

    ``KeyError`` / ``IndexError`` are bugs unless they are ``VlmtuneError`` s (``UnknownName``).
    """
    errors: tuple[type[BaseException], ...] = (VlmtuneError, ValueError, NotImplementedError, OSError)
    api = sys.modules.get("vlmtune.blackbox.api")  # a budget error can only come from a loaded black box
    return errors + ((api.BudgetExceeded,) if api is not None else ())


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line that names the command and where its usage is (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def os_error_message(exc: OSError, args: argparse.Namespace) -> str:
    """An ``OSError`` as one line naming the flag whose path it concerns (``--out /proc/nope: No such file ...``)."""
    name = exc.filename
    if name is None:
        return str(exc)
    for key, value in vars(args).items():
        if isinstance(value, str | Path) and str(value) and key != "command":
            given = str(value).rstrip("/")
            if str(name) == given or str(name).startswith(given + "/"):
                return f"--{key.replace('_', '-')} {value}: {exc.strerror or exc}"
    return f"{name}: {exc.strerror or exc}"


def build_parser() -> argparse.ArgumentParser:
    verbosity = OneLineParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    ap = OneLineParser(
        prog="vlmtune", description="Adapt CLIP-style vision-language models to your task.", parents=[verbosity]
    )
    ap.add_argument("--version", action="version", version=f"vlmtune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbosity], **kw)

    for module in COMMANDS:
        module.add(command)
    return ap


def quiet_bars_off_a_terminal() -> None:
    """With stderr redirected (a file, a pipe, a batch job's log), progress bars refresh every 30 s instead of many
    times a second (tqdm reads ``TQDM_*`` defaults from the environment; a user's own setting wins)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")


def main(argv: list[str] | None = None) -> int:
    quiet_bars_off_a_terminal()
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if getattr(args, "config_hook", None) is not None:  # a --config file becomes the subcommand's defaults
            args = args.config_hook(parser, argv, args)
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("vlmtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        usage = isinstance(exc, user_errors())
        if verbose:
            log.exception("details")
        message = str(exc).strip() or type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, VlmtuneError):
            message = os_error_message(exc, args)
        if usage:
            print(f"vlmtune: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        hint = "" if verbose else " (run with -v for the traceback)"
        print(f"vlmtune: internal error: {type(exc).__name__}: {message.splitlines()[0]}{hint}", file=sys.stderr)
        return EXIT_FAILURE
