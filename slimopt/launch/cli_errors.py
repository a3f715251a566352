"""The command-line tools' error contract: bad input exits with code 2 and one line,
``PROG: error: ...``, naming the flag or file; never a traceback, and no usage block."""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def first_line(err: BaseException, default: str | None = None, limit: int | None = 300) -> str:
    """The first line of ``err``'s message, cut at ``limit`` characters, for a one-line report;
    ``default`` (else the exception's type name) when the message is empty."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else (default if default is not None else type(err).__name__)
    return line[:limit] if limit is not None else line
