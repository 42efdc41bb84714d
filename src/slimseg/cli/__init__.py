"""The slimseg command line."""

from __future__ import annotations

import sys


def main() -> None:
    """The ``slimseg`` command. Importing torch takes seconds: a Ctrl-C meanwhile is the same
    one-line error and exit status 130 as during the work, not a traceback."""
    try:
        from slimseg.cli.app import main as run_command
    except KeyboardInterrupt:
        sys.stderr.write("slimseg: error: interrupted\n")
        sys.exit(130)
    run_command()
