"""The command-line tools' error contract: bad input exits with code 2 and one line,
``PROG: error: ...``, naming the flag or file; never a traceback, and no usage block."""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
