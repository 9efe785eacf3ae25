"""The enforcer's commands, ``pinhole enforcer`` and ``pinhole ctl``, with nothing of the
harness: ``python -m enforcer`` runs them alone (a lab starts the daemon hundreds of times
a run, and an installation without the testbed runs it so), and the ``pinhole`` command
(testbed.cli) adds the testbed's commands beside them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REQUIRED_TOOLS = ("ip", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore",
                  "conntrack")


class UsageError(Exception):
    """A problem the user can fix; printed as one line, never a traceback."""


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} needs root (network namespaces and netfilter): run it with sudo")


def require_tools(tools: Sequence[str] = REQUIRED_TOOLS) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise UsageError(f"missing tools: {', '.join(missing)} (run 'make setup' or "
                         "apt-get install iproute2 iptables conntrack tcpdump)")


def _enforcer(args: argparse.Namespace) -> int:
    from enforcer import config as config_mod
    from enforcer import daemon

    require_root("pinhole enforcer")
    require_tools()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s pinhole-enforcer %(levelname)s %(message)s")
    if args.verbose:
        logging.getLogger("pinhole").setLevel(logging.DEBUG)
    config = config_mod.load(args.config)
    if args.socket is not None:
        wrong = config_mod.socket_path_problem(args.socket)
        if wrong is not None:
            raise UsageError(f"--socket: {wrong}")
        from dataclasses import replace
        config = replace(config, control_socket=args.socket)
    if args.netns is not None:
        if not args.netns:
            raise UsageError("--netns: the namespace's name is empty")
        from pyroute2 import netns as pyroute2_netns
        try:
            pyroute2_netns.setns(args.netns, flags=0)  # never create one
        except OSError as exc:
            raise UsageError(f"cannot enter network namespace '{args.netns}': {exc.strerror}") from None
    if args.lockdown or args.unload:
        done = daemon.lockdown(config) if args.lockdown else daemon.unload(config)
        what = "lockdown in place" if args.lockdown else "unloaded"
        print(f"pinhole: {what}" + "".join(f"\n  replaced or removed: {item}" for item in done))
        return 0
    run: daemon.Daemon | None = daemon.Daemon(config, source=Path(args.config))
    while run is not None:  # a control client's restart hands over to the next run
        run.run()
        run = run.successor
    return 0


def _ctl(args: argparse.Namespace) -> int:
    from enforcer.client import Client, Listing
    from enforcer.protocol import MAX_LISTED

    params = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"parameter '{item}' is not KEY=VALUE")
        if key in params:
            raise UsageError(f"parameter '{key}' is given twice")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    with Client(args.socket) as client:
        result = client.call(args.method, **params)
    print(json.dumps(result, indent=2))
    if isinstance(result, Listing) and result.more:
        print(f"({result.more} more not listed: ask with a larger limit=N, at most {MAX_LISTED}, "
              "or, for sessions, actions and binds, with after=ID, the last id listed)",
              file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``enforcer`` and ``ctl`` subcommands."""
    from enforcer.config import DEFAULT_SOCKET

    p = sub.add_parser("enforcer", help="run the reference enforcer daemon")
    p.add_argument("--config", required=True, help="policy and settings (TOML)")
    p.add_argument("--netns", help="network namespace to enforce in (default: the current one)")
    p.add_argument("--socket", help=f"control socket path (default: from config, else {DEFAULT_SOCKET})")
    p.add_argument("-v", "--verbose", action="store_true", help="log every decision")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--lockdown", action="store_true",
                      help="put the lockdown base in place and exit (before a first start, at boot)")
    once.add_argument("--unload", action="store_true",
                      help="remove every rule of the enforcer, lockdown included, and exit")
    p.set_defaults(func=_enforcer)

    p = sub.add_parser("ctl", help="call a control API method, e.g. 'pinhole ctl status'")
    p.add_argument("method")
    p.add_argument("params", nargs="*", help="KEY=VALUE (VALUE parsed as JSON when it can be)")
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    p.set_defaults(func=_ctl)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse and run a command: a user's mistake is one line on stderr and exit 2."""
    from enforcer.client import ControlError, SessionApiError
    from enforcer.config import ConfigError
    from enforcer.daemon import StartupError
    from enforcer.dataplane import DataplaneError

    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except (UsageError, ConfigError, StartupError, DataplaneError, ControlError) as exc:
        print(f"pinhole: {exc}", file=sys.stderr)
        return 2
    except SessionApiError as exc:
        print(f"pinhole: {exc.name} (0x{exc.hresult:08X}): {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pinhole-enforcer",
                                     description="pinhole's reference enforcer and its control client")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)
