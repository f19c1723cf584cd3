"""The ``vlmtune`` command line, one module per command (``app`` builds the parser and maps errors to exit codes).

Exit codes: 0 ok; 1 a runtime failure (a bug prints one line and "run with -v for the traceback"); 2 a usage error
(a wrong name, value or file: one line on stderr, ``-v`` adds the traceback); 130 Ctrl-C.
"""

from vlmtune.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
