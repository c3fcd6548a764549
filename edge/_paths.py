"""Where a box keeps its files by default: the constants the command line needs while it builds its parser.

Here rather than in ``edge.config`` so that ``edge --help`` and the ``--config`` defaults it shows do not import the
configuration machinery (TOML parsing, logging, every config dataclass). Only the standard library's ``pathlib``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_CONFIG_PATH"]

DEFAULT_CONFIG_PATH = Path("/etc/edge/edge.toml")
