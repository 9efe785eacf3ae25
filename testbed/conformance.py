"""`pinhole conformance`: build the testbed, run the clause suite, print the matrix."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("conformance", help="run the clause suite and print the result matrix")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
