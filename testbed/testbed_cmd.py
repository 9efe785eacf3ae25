"""``pinhole testbed up|down|sweep|exec|list``: testbeds from the command line.

A testbed brought up here is *detached*: it outlives the CLI process and stays
until ``pinhole testbed down ID`` (or ``sweep --all``).

``exec`` takes ``[ID] NODE -- CMD...``; the id may be omitted (or given as
``--id``) when exactly one testbed is up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from testbed.ledger import CorruptLedger, LedgerError
from testbed.topology import TOPOLOGIES


class _Fail(Exception):
    """One line for the user, exit status 2."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``testbed`` subcommand on an argparse subparsers object."""
    from testbed.cli import plain

    p: argparse.ArgumentParser = subparsers.add_parser(
        "testbed",
        help="build, inspect and remove namespace testbeds",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="testbed_cmd", metavar="{up,down,sweep,exec,list}")
    up = sub.add_parser("up", help="build a testbed that stays until 'down'")
    up.add_argument("--variant", choices=TOPOLOGIES, default="routed",
                    help="the topology: routed (one internal network; the servers route it "
                         "back via the fw), nat (the same, but the servers have no route to "
                         "it: the fw translates), split (two internal networks on the fw's "
                         "int0 and int1, routed; for ingress checks); default: routed")
    up.add_argument("--tag", help="a label stored in the ledger")
    down = sub.add_parser("down", help="remove a testbed (or all of them)")
    down.add_argument("id", nargs="?", help="testbed id (see 'pinhole testbed list')")
    down.add_argument("--all", action="store_true", help="remove every testbed")
    sweep = sub.add_parser("sweep", help="remove what dead testbed owners left behind")
    sweep.add_argument("--all", action="store_true",
                       help="also remove live and detached testbeds")
    sub.add_parser("list", help="list testbeds and their state")
    ex = sub.add_parser(
        "exec", help="run a command in a node: exec [ID] NODE -- CMD...",
        usage="pinhole testbed exec [--id ID] [ID] NODE -- CMD...",
    )
    ex.add_argument("--id", dest="tb_id", help="testbed id (optional if only one is up)")
    ex.add_argument("rest", nargs=argparse.REMAINDER, help="[ID] NODE -- CMD...")
    p.set_defaults(func=run)
    return p


def _require_root() -> None:
    if os.geteuid() != 0:
        raise _Fail("pinhole testbed needs root (network namespaces): run it with sudo")


def _removes_it(bad: CorruptLedger) -> str:
    """What to say of a corrupt ledger: which file, what is wrong, what to do."""
    return f"{bad}: 'pinhole testbed down {bad.id}' removes it"


def _only_testbed() -> str:
    from testbed.ledger import ledgers

    found = ledgers()
    live = [led for led in found if not isinstance(led, CorruptLedger) and led.is_live()]
    # (a testbed whose ledger is corrupt may be up, but cannot be reached)
    also = "".join(f"; {_removes_it(bad)}" for bad in found if isinstance(bad, CorruptLedger))
    if not live:
        raise _Fail(f"no testbed is up: start one with 'pinhole testbed up'{also}")
    if len(live) > 1:
        ids = ", ".join(led.id for led in live)
        raise _Fail(f"several testbeds are up ({ids}): name one with --id ID{also}")
    return live[0].id


def _attach(tb_id: str) -> Any:
    from testbed.build import Testbed, TestbedError, UnknownTestbed

    try:
        return Testbed.attach(tb_id)
    except UnknownTestbed:
        raise _Fail(
            f"no testbed with id {tb_id!r}: see 'pinhole testbed list'"
        ) from None
    except CorruptLedger as e:
        raise _Fail(_removes_it(e)) from None
    except TestbedError as e:
        raise _Fail(f"{e}: 'pinhole testbed down {tb_id}' removes it") from None


def _up(args: argparse.Namespace) -> int:
    from testbed.build import Testbed, TestbedError
    from testbed.topology import named

    try:
        tb = Testbed.up(named(args.variant), tag=args.tag, detached=True)
    except TestbedError as e:
        raise _Fail(f"building the testbed failed: {e}") from None
    print(tb.id)
    print(tb.describe(), end="")
    print(f"built in {tb.build_seconds:.2f} s; remove with 'pinhole testbed down {tb.id}'")
    return 0


def _down(args: argparse.Namespace) -> int:
    from testbed import ledger

    if args.all:
        for line in ledger.sweep(all_=True):
            print(f"removed {line}")
        return 0
    if not args.id:
        raise _Fail("name the testbed to remove ('pinhole testbed down ID') or use --all")
    try:
        led = ledger.Ledger.load(args.id)
    except FileNotFoundError:
        raise _Fail(f"no testbed with id {args.id!r}: see 'pinhole testbed list'") from None
    except CorruptLedger as bad:
        # what it recorded is not known: its file goes, and what is named for the testbed
        for line in ledger.remove_corrupt(bad):
            print(f"removed {line}")
        print(f"removed testbed {args.id} (its ledger was corrupt: processes it started "
              "outside its namespaces, if any, are not known)")
        return 0
    # The ledger says everything there is to remove, whoever built the testbed.
    ledger.teardown(led)
    print(f"removed testbed {args.id}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from testbed import ledger

    removed = ledger.sweep(all_=args.all)
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print("nothing to remove")
    for bad in ledger.ledgers():  # (left by a sweep that is not --all: whose it is is not known)
        if isinstance(bad, CorruptLedger):
            print(f"pinhole: {_removes_it(bad)}", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from testbed.ledger import ledgers

    leds = ledgers()
    if not leds:
        print("no testbeds")
    for led in leds:
        if isinstance(led, CorruptLedger):
            print(f"{led.id}  {'?':7} {_removes_it(led)}")
            continue
        if led.detached:
            state = "detached"
        elif led.owner_alive():
            state = f"owned by pid {led.owner_pid}"
        else:
            state = "owner dead (sweep will remove it)"
        tag = f" tag={led.tag}" if led.tag else ""
        print(f"{led.id}  {led.variant or '?':7} {state}{tag}")
    return 0


def _exec(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if "--" in rest:
        i = rest.index("--")
        where, cmd = rest[:i], rest[i + 1 :]
    else:
        # Without "--": [ID] NODE CMD... is ambiguous, so take NODE CMD...
        where, cmd = rest[:1], rest[1:]
    tb_id = args.tb_id
    if len(where) == 2 and tb_id is None:
        tb_id, node = where
    elif len(where) == 1:
        node = where[0]
    else:
        raise _Fail("usage: pinhole testbed exec [--id ID] [ID] NODE -- CMD...")
    if not cmd:
        raise _Fail(f"no command given: pinhole testbed exec {node} -- CMD...")
    tb = _attach(tb_id or _only_testbed())
    if node not in tb.namespaces:
        raise _Fail(
            f"no node {node!r} in testbed {tb.id} "
            f"(nodes: {', '.join(tb.topology.node_names)})"
        )
    try:
        r = subprocess.run(["ip", "netns", "exec", tb.netns(node), *cmd], check=False)
    except OSError as e:
        raise _Fail(f"cannot run 'ip netns exec': {e}") from None
    return r.returncode


def run(args: argparse.Namespace) -> int:
    """Entry point for ``pinhole testbed ...``; returns the exit status."""
    handlers = {"up": _up, "down": _down, "sweep": _sweep, "exec": _exec, "list": _list}
    cmd = getattr(args, "testbed_cmd", None)
    if cmd not in handlers:
        print("pinhole: say what to do: pinhole testbed up|down|sweep|exec|list "
              "(see --help)", file=sys.stderr)
        return 2
    try:
        if cmd != "list":
            _require_root()
        return handlers[cmd](args)
    except (_Fail, LedgerError) as e:
        print(f"pinhole: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"pinhole: permission denied ({e.filename or e}): run it as root", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m testbed.testbed_cmd ...``), for use
    before the subcommand is wired into ``pinhole``."""
    parser = argparse.ArgumentParser(prog="pinhole")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
