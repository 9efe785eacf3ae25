"""The ``pinhole`` command: the enforcer's commands (enforcer.cli: the daemon and its control
client) and the harness's (testbed, conformance runner, reports)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from enforcer.cli import UsageError, add_parsers, require_root, require_tools, run

__all__ = ["UsageError", "build_parser", "main", "plain", "require_root", "require_tools"]


def plain(doc: str | None) -> str:
    """A module's docstring as ``--help`` shows it: its literals (reST's double backquotes,
    Markdown's single ones) in plain quotes."""
    return re.sub(r"``(.+?)``|`(.+?)`", lambda m: f"'{m.group(1) or m.group(2)}'", doc or "")


def build_parser() -> argparse.ArgumentParser:
    from testbed.conformance import add_parser as add_conformance
    from testbed.report import add_parser as add_report
    from testbed.testbed_cmd import add_parser as add_testbed

    parser = argparse.ArgumentParser(prog="pinhole", description=plain(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    add_testbed(sub)
    add_conformance(sub)
    add_report(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)
