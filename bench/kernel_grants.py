"""Kernel grants: can a pending single-use permission live in the kernel?

Run from the repository root, as root::

    .venv/bin/python -m bench.kernel_grants [--count 100] [--reps 10] [--group 7]

A measurement and a prototype, not part of the enforcer. A permission "client C may
open protocol P to target T port N" becomes an element of an nft set with a timeout.
The first packet of the new flow (``ct state new``) matches it in a native nft chain
at forward priority ``filter - 1``; the same rule deletes the element (single use),
sets the conntrack mark that the iptables ``FORWARD`` chain after it accepts on, and
tells user space with ``log group N`` (NFLOG), without holding the packet.
ALLOW_MULTIPLE is an element without the delete.

It prints four parts, all measured in one ``standard("routed")`` testbed that is
always taken down (namespaces, rules and processes go with it, Ctrl-C included):

1. rule shapes: which nft rules this kernel and nft accept (``nft -c`` in fw), and
   how the kernel answers element updates over netlink;
2. behaviour: real connections through fw (single use, the per-element one-packet
   limit, a retransmitted SYN, UDP, element timeout, ALLOW_MULTIPLE, IPv6, the
   interface in the key, the hook order);
3. latency: the first SYN of an FTP data connection (``connect()``, SYN to SYN-ACK
   through fw) after PASV, for plain forwarding, the conntrack FTP helper (the
   baseline), kernel grants with each way of telling user space, and a Python
   NFQUEUE consumer; with the notifications counted and timed;
4. costs: a grant over netlink (one, and batched), a delete, and kernel memory.

Writes ``bench/kernel_grants.json`` with every sample.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import platform
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    CLIENT,
    CLIENT_ADDR,
    FW,
    READY_TIMEOUT,
    ROOT,
    SERVER,
    SERVER_ADDR,
    SignalStop,
    format_table,
    last_json,
    read_line,
    stop_proc,
)
from bench.flows import PASV_RE, _read_reply
from enforcer import nflog
from enforcer.dataplane import (
    MAPS_TABLE,
    MARK_KERNEL,
    MARK_MODE,
    NETLINK_NETFILTER,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_CTNETLINK,
    ONE_PACKET,
    NatMaps,
    _port,
    _register,
    _request,
    batch_marker,
    destroy_message,
    netlink_attributes,
    netlink_messages,
    set_elements_message,
)
from testbed.build import Testbed
from testbed.topology import standard

OUT = Path(__file__).resolve().parent / "kernel_grants.json"
CLIENT6, SERVER6 = "2001:db8:1::11", "2001:db8:2::21"
INTERNAL_IF = "int0"  # fw's interface to c1
TCP = socket.IPPROTO_TCP
CONNECT_TIMEOUT = 2.0
REFUSED_WAIT = 0.4  # how long a connect() that the fw should drop is given
NFQUEUE_FOR_THE_REST = 9  # the enforcer's queue rule for other new flows (no consumer: dropped)
CONSUMER_QUEUE = 5  # bench.consumers' queue, as bench.bindings uses it
# The conntrack mark a grant sets: kernel mode, and a bit no enforcer mark uses, so
# that the ctnetlink listener's socket filter can pick the flows kernel grants admitted.
GRANTED = 0x00400000
GRANT_MARK = MARK_KERNEL | GRANTED
SET_SIZE = 1 << 20  # elements a set may hold (nft makes a set a rule updates 65535 by default)
PRIORITY = "filter - 1"  # before the iptables filter table's FORWARD (priority 0)

# netlink: NFLOG (linux/netfilter/nfnetlink_log.h) and ctnetlink events
NFULNL_QTHRESH_DEFAULT = 100
NFNLGRP_CONNTRACK_NEW = 1
IPCTNL_MSG_CT_NEW = 0
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_TUPLE_PROTO, CTA_MARK = 1, 1, 2, 8
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SKF_AD_NLATTR = 0xFFFFF000 + 12  # classic BPF: find a netlink attribute (A: offset, X: type)
CLONE_NEWNET = 0x40000000


# -- sockets in a namespace -------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the body in namespace ``name`` (this thread); sockets made there stay in it."""
    with open(f"/run/netns/{name}") as target, open("/proc/thread-self/ns/net") as home:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:  # cannot go on in the wrong place
                os._exit(3)


# -- the kernel state ---------------------------------------------------------------------------

def key(client: str, target: str, proto: int, port: int, iface: str | None = None) -> bytes:
    """A grant's set key: [ifname .] client . target . protocol . port, each component
    padded to a 4-byte register (the layout of enforcer.dataplane's NAT map keys)."""
    head = iface.encode().ljust(16, b"\0") if iface is not None else b""
    return (head + ipaddress.ip_address(client).packed + ipaddress.ip_address(target).packed
            + _register(bytes([proto])) + _port(port))


def family_of(address: str) -> str:
    return "ip" if ipaddress.ip_address(address).version == 4 else "ip6"


def render_grants(log_group: int | None, *, priority: str = PRIORITY) -> str:
    """The grant table: per family, a set of single-use keys with a map of their marks,
    and a map of ALLOW_MULTIPLE keys to marks; IPv4 also with the interface in the key,
    and as one map that the rule deletes from (nft 1.0.6 can write that rule for keys of
    at most 16 bytes only). The chain sets the ct mark (and the packet's, which the
    enforcer's SNAT rules read) and logs a single use; it accepts nothing itself. A
    single-use set gives each element the ``ONE_PACKET`` limit."""
    log = f" log group {log_group}" if log_group is not None else ""
    lines = [f"table inet {MAPS_TABLE} {{"]
    rules = []
    for proto, addr in (("ip", "ipv4_addr"), ("ip6", "ipv6_addr")):
        k = f"{proto} saddr . {proto} daddr . meta l4proto . th dport"
        t = f"{addr} . {addr} . inet_proto . inet_service"
        opts = f"flags timeout; size {SET_SIZE};"
        lines += [f"  set once_{proto} {{ type {t}; {opts} {ONE_PACKET}; }}",
                  f"  map once_mark_{proto} {{ type {t} : mark; {opts} }}",
                  f"  map multi_mark_{proto} {{ type {t} : mark; {opts} }}",
                  f"  set once_if_{proto} {{ type ifname . {t}; {opts} {ONE_PACKET}; }}",
                  f"  map once_if_mark_{proto} {{ type ifname . {t} : mark; {opts} }}"]
        rules += [f"    ct state new {k} @once_{proto} ct mark set {k} map @once_mark_{proto} "
                  f"meta mark set ct mark delete @once_{proto} {{ {k} }}{log}",
                  f"    ct state new iifname . {k} @once_if_{proto} "
                  f"ct mark set iifname . {k} map @once_if_mark_{proto} "
                  f"meta mark set ct mark delete @once_if_{proto} {{ iifname . {k} }}{log}",
                  f"    ct state new ct mark set {k} map @multi_mark_{proto} meta mark set ct mark"]
        if proto == "ip":
            lines.append(f"  map single_{proto} {{ type {t} : mark; {opts} }}")
            rules.append(f"    ct state new ct mark set {k} map @single_{proto} meta mark set ct mark "
                         f"delete @single_{proto} {{ {k} : 0x0 }}{log}")
    lines += ["  chain grants {", f"    type filter hook forward priority {priority}; policy accept;",
              *rules, "  }", "}"]
    return "\n".join(lines) + "\n"


# The enforcer's FORWARD chain, cut down: admitted flows (ct mark, kernel mode) go on; other
# new flows go to a queue that nobody reads (dropped: fail closed); the rest is dropped.
ENFORCER_FORWARD = [
    ["-m", "connmark", "--mark", f"0x{MARK_KERNEL:08x}/0x{MARK_MODE:08x}", "-j", "ACCEPT"],
    ["-m", "conntrack", "--ctstate", "NEW", "-j", "NFQUEUE", "--queue-num", str(NFQUEUE_FOR_THE_REST)],
    ["-j", "DROP"],
]


class GrantWriter(NatMaps):
    """Writes grants as set elements over netlink, one transaction a call, with
    enforcer.dataplane's encoders (``batch_marker``, ``set_elements_message``,
    ``_request``) and NatMaps' socket. Make it inside the fw namespace."""

    def transaction(self, messages: list[tuple[str, list[tuple[bytes, bytes]], bool]],
                    timeout_ms: int | None = None, first: tuple[bytes, ...] = ()) -> list[int]:
        """Send one transaction (``first``: encoded messages that open it); the errno of each
        message refused (one refusal aborts all)."""
        waiting = {struct.unpack_from("=I", msg, 8)[0] for msg in first}
        data = batch_marker(NFNL_MSG_BATCH_BEGIN, next(self._seq)) + b"".join(first)
        for name, elements, add in messages:
            seq = next(self._seq)
            data += set_elements_message(name, elements, add, seq, [timeout_ms] * len(elements))
            waiting.add(seq)
        data += batch_marker(NFNL_MSG_BATCH_END, next(self._seq))
        return _request(self.sock, data, waiting, "writing grants")

    def grant(self, keys: list[bytes], proto: str = "ip", mark: int = GRANT_MARK,
              single_use: bool = True, timeout_ms: int | None = 30_000, kind: str = "once") -> None:
        """Grant ``keys``: single use (the key in the once set, its mark in the once map) or
        not (the mark in the multi map); ``kind`` "once_if" for keys with the interface,
        "single" for the IPv4 one-map shape."""
        value = struct.pack("=I", mark)
        first: tuple[bytes, ...] = ()
        if not single_use:
            messages = [(f"multi_mark_{proto}", [(k, value) for k in keys], True)]
        elif kind == "single":
            messages = [(f"single_{proto}", [(k, value) for k in keys], True)]
        else:
            # The mark element that a used grant of the same key left (the rule deletes the
            # key alone) goes in the same transaction: the new mark may differ.
            first = (destroy_message(f"{kind}_mark_{proto}", keys, next(self._seq)),)
            messages = [(f"{kind}_{proto}", [(k, b"") for k in keys], True),
                        (f"{kind}_mark_{proto}", [(k, value) for k in keys], True)]
        errors = self.transaction(messages, timeout_ms, first)
        if errors:
            raise OSError(errors[0], f"grant refused: {os.strerror(errors[0])}")


# -- the listener in fw: what the kernel admitted, as it happens ------------------------------

def packet_tuple(pkt: bytes) -> tuple[str, str, int, int, int] | None:
    """(source, destination, protocol, source port, destination port) of an IP packet."""
    if len(pkt) >= 24 and pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        proto, src, dst = pkt[9], pkt[12:16], pkt[16:20]
    elif len(pkt) >= 44 and pkt[0] >> 4 == 6:
        ihl, proto, src, dst = 40, pkt[6], pkt[8:24], pkt[24:40]
    else:
        return None
    if len(pkt) < ihl + 4:
        return None
    sport, dport = struct.unpack_from("!HH", pkt, ihl)
    return (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), proto, sport, dport)


def nflog_tuples(data: bytes) -> Iterator[tuple[str, str, int, int, int]]:
    for packet in nflog.packets(data):
        t = packet_tuple(packet)
        if t is not None:
            yield t


def mark_filter(mark: int) -> bytes:
    """A classic BPF socket filter: only ctnetlink messages whose CTA_MARK has all of ``mark``'s
    bits, so the listener is not woken for every other new flow through the fw."""
    ins = [(0x00, 0, 0, 20),              # A = 20: the attributes, after nlmsghdr and nfgenmsg
           (0x01, 0, 0, CTA_MARK),        # X = CTA_MARK
           (0x20, 0, 0, SKF_AD_NLATTR),   # A = offset of that attribute (0: none)
           (0x15, 4, 0, 0),               # none: drop
           (0x07, 0, 0, 0),               # X = A
           (0x40, 0, 0, 4),               # A = the mark (big-endian word after the header)
           (0x54, 0, 0, mark),            # A &= mark
           (0x15, 1, 0, mark),            # all bits: accept
           (0x06, 0, 0, 0),               # drop
           (0x06, 0, 0, 0xFFFF)]          # accept
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


def ctevents_socket(mark: int | None) -> tuple[socket.socket, Any]:
    """A netlink socket subscribed to new-conntrack events, filtered in the kernel by mark."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 1 << (NFNLGRP_CONNTRACK_NEW - 1)))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    keep = None
    if mark is not None:
        prog = mark_filter(mark)
        keep = ctypes.create_string_buffer(prog, len(prog))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                        struct.pack("HL", len(prog) // 8, ctypes.addressof(keep)))
    return sock, keep


def ctevent_tuples(data: bytes) -> Iterator[tuple[tuple[str, str, int, int, int], int]]:
    """((source, destination, protocol, ports), mark) of each new-conntrack event."""
    for kind, start, end in netlink_messages(data):
        if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            continue
        src = dst = ""
        proto = sport = dport = mark = 0
        for attr, a, b in netlink_attributes(data, start + 4, end):
            if attr == CTA_MARK:
                mark = struct.unpack_from("!I", data, a)[0]
            elif attr == CTA_TUPLE_ORIG:
                for sub, c, d in netlink_attributes(data, a, b):
                    for leaf, e, f in netlink_attributes(data, c, d):
                        if sub == CTA_TUPLE_IP and leaf in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                            src = str(ipaddress.ip_address(data[e:f]))
                        elif sub == CTA_TUPLE_IP and leaf in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                            dst = str(ipaddress.ip_address(data[e:f]))
                        elif sub == CTA_TUPLE_PROTO and leaf == CTA_PROTO_NUM:
                            proto = data[e]
                        elif sub == CTA_TUPLE_PROTO and leaf == CTA_PROTO_SRC_PORT:
                            sport = struct.unpack_from("!H", data, e)[0]
                        elif sub == CTA_TUPLE_PROTO and leaf == CTA_PROTO_DST_PORT:
                            dport = struct.unpack_from("!H", data, e)[0]
        yield (src, dst, proto, sport, dport), mark


def listen(args: argparse.Namespace) -> int:
    """The daemon's side, in fw: read what the kernel admitted (NFLOG or ctnetlink events)
    and note when each notice was read. Prints ``ready``, and on SIGTERM one JSON line."""
    if args.mode == "nflog":
        sock = nflog.bind_group(args.group, threshold=args.qthresh, flush_ms=args.flush_ms, copy=64)
    else:
        sock, _filter = ctevents_socket(None if args.no_filter else GRANTED)
    seen: list[tuple[int, int, int]] = []  # (source port, destination port, monotonic ns)
    others = enobufs = wakeups = 0
    stop = SignalStop()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(stop.wake, selectors.EVENT_READ)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    print("ready", flush=True)
    while not stop.stopped:
        for k, _ in sel.select():
            if k.fileobj is stop.wake:
                stop.drain()
                continue
            wakeups += 1
            try:
                data = sock.recv(1 << 16)
            except OSError:  # ENOBUFS: the kernel dropped notices (socket buffer full)
                enobufs += 1
                continue
            now = time.monotonic_ns()
            if args.mode == "nflog":
                tuples = list(nflog_tuples(data))
            else:
                tuples = []
                for t, mark in ctevent_tuples(data):
                    if mark & GRANTED:
                        tuples.append(t)
                    else:
                        others += 1
            seen += [(sport, dport, now) for _src, _dst, _proto, sport, dport in tuples]
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"seen": seen, "others": others, "enobufs": enobufs, "wakeups": wakeups,
                      "cpu_s": cpu}), flush=True)
    return 0


# -- the testbed side ---------------------------------------------------------------------------

def fw(tb: Testbed, *argv: str, check: bool = True,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    return tb.run(FW, list(argv), check=check, input=input)


class Rules:
    """Rules put in fw for one measurement, taken out again (the namespace goes anyway)."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.undo: list[list[str]] = []

    def iptables(self, table: str, chain: str, specs: list[list[str]],
                 families: tuple[str, ...] = ("iptables",)) -> None:
        for tool in families:
            for spec in specs:
                fw(self.tb, tool, "-t", table, "-A", chain, *spec)
                self.undo.append([tool, "-t", table, "-D", chain, *spec])

    def nft(self, text: str) -> None:
        fw(self.tb, "nft", "-f", "-", input=text)
        self.undo.append(["nft", "delete", "table", "inet", MAPS_TABLE])

    def close(self) -> None:
        for argv in reversed(self.undo):
            fw(self.tb, *argv, check=False)
        self.undo.clear()
        fw(self.tb, "conntrack", "-F", check=False)


class Process:
    """A process in a node that prints ``ready``, stopped with SIGTERM (its last JSON line)."""

    def __init__(self, tb: Testbed, node: str, argv: list[str]) -> None:
        self.tb = tb
        self.proc = tb.popen(node, [sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, bufsize=0)
        line = read_line(self.proc, READY_TIMEOUT)
        if line != "ready":
            _out, err = stop_proc(tb, self.proc)
            raise RuntimeError(f"{' '.join(argv[:3])} did not start: {line!r} {err.strip()[-300:]}")

    def stop(self) -> dict[str, Any]:
        out, err = stop_proc(self.tb, self.proc)
        return last_json(out) or {"error": err.strip()[-300:]}


def connect_once(tb: Testbed, addr: str, port: int, timeout: float) -> bool:
    """One TCP connect() from c1; True if s1 answered within ``timeout`` (a SYN-ACK, or a
    reset where nothing listens: either way the SYN went through fw, and the answer too)."""
    with netns(tb.netns(CLIENT)):
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        return s.connect_ex((addr, port)) in (0, errno.ECONNREFUSED)
    except OSError:  # the timeout
        return False
    finally:
        s.close()


# -- 1. rule shapes -------------------------------------------------------------------------------

K4 = "ip saddr . ip daddr . meta l4proto . th dport"
K6 = "ip6 saddr . ip6 daddr . meta l4proto . th dport"
T4 = "ipv4_addr . ipv4_addr . inet_proto . inet_service"
T6 = "ipv6_addr . ipv6_addr . inet_proto . inet_service"
SHAPES: list[tuple[str, str, str]] = [
    # (what, set/map declarations, rule)
    ("set, IPv4 key, delete from the rule", f"set s {{ type {T4}; flags timeout; }}",
     f"ct state new {K4} @s delete @s {{ {K4} }} ct mark set 0x10000000 log group 7"),
    ("set, IPv6 key, delete from the rule", f"set s {{ type {T6}; flags timeout; }}",
     f"ct state new {K6} @s delete @s {{ {K6} }} ct mark set 0x10000000"),
    ("set, iifname . IPv4 key, delete", f"set s {{ type ifname . {T4}; flags timeout; }}",
     f"ct state new iifname . {K4} @s delete @s {{ iifname . {K4} }} ct mark set 0x10000000"),
    ("set, iifname . IPv6 key, delete", f"set s {{ type ifname . {T6}; flags timeout; }}",
     f"ct state new iifname . {K6} @s delete @s {{ iifname . {K6} }} ct mark set 0x10000000"),
    ("set, iif (index) . IPv4 key, delete", f"set s {{ type iface_index . {T4}; flags timeout; }}",
     f"ct state new iif . {K4} @s delete @s {{ iif . {K4} }} ct mark set 0x10000000"),
    ("map to mark, IPv4, ct mark set from the map", f"map m {{ type {T4} : mark; flags timeout; }}",
     f"ct state new ct mark set {K4} map @m"),
    ("map, IPv4, delete @m { key } (no value)", f"map m {{ type {T4} : mark; flags timeout; }}",
     f"ct state new {K4} @m delete @m {{ {K4} }}"),
    ("map, IPv4, mark from it + delete @m { key : 0x0 }", f"map m {{ type {T4} : mark; flags timeout; }}",
     f"ct state new ct mark set {K4} map @m delete @m {{ {K4} : 0x0 }} log group 7"),
    ("map, IPv6, mark from it + delete @m { key : 0x0 }", f"map m {{ type {T6} : mark; flags timeout; }}",
     f"ct state new ct mark set {K6} map @m delete @m {{ {K6} : 0x0 }}"),
    ("map, iifname . IPv4, delete @m { key : 0x0 }", f"map m {{ type ifname . {T4} : mark; flags timeout; }}",
     f"ct state new delete @m {{ iifname . {K4} : 0x0 }}"),
    ("map, IPv4 5-tuple (20 B key), delete", f"map m {{ type {T4} . inet_service : mark; flags timeout; }}",
     f"ct state new delete @m {{ {K4} . th sport : 0x0 }}"),
    ("set + map, IPv6: set for single use, map for the mark",
     f"set s {{ type {T6}; flags timeout; }}\n map m {{ type {T6} : mark; flags timeout; }}",
     f"ct state new {K6} @s ct mark set {K6} map @m meta mark set ct mark delete @s {{ {K6} }} log group 7"),
    ("interval set (wildcards), delete from the rule", f"set s {{ type {T4}; flags interval,timeout; }}",
     f"ct state new {K4} @s delete @s {{ {K4} }}"),
    ("interval map (wildcards), lookup only", f"map m {{ type {T4} : mark; flags interval,timeout; }}",
     f"ct state new ct mark set {K4} map @m"),
    ("log group with queue-threshold 1", f"set s {{ type {T4}; flags timeout; }}",
     f"ct state new {K4} @s log group 7 queue-threshold 1"),
    ("native queue (known missing here)", "", "ct state new queue num 3"),
]


def probe_shapes(tb: Testbed) -> list[dict[str, str]]:
    """Check each shape with ``nft -c`` (the kernel validates, nothing is committed)."""
    out = []
    for what, decls, rule in SHAPES:
        text = (f"table inet kg_probe {{\n {decls}\n chain c {{ type filter hook forward priority "
                f"{PRIORITY}; policy accept;\n  {rule}\n }}\n}}\n")
        r = fw(tb, "nft", "-c", "-f", "-", input=text, check=False)
        err = " ".join(line.strip() for line in r.stderr.splitlines()
                       if "Error" in line or "Assertion" in line or "Abort" in line)
        out.append({"shape": what, "rule": rule, "ok": "yes" if r.returncode == 0 else "NO",
                    "error": err or (f"exit {r.returncode}" if r.returncode else "")})
    return out


def probe_elements(tb: Testbed, w: GrantWriter) -> list[dict[str, str]]:
    """How the kernel answers element updates over netlink (the grant table is loaded)."""
    k = key(CLIENT_ADDR, SERVER_ADDR, TCP, 65001)
    mark = struct.pack("=I", GRANT_MARK)
    cases: list[tuple[str, list[tuple[str, list[tuple[bytes, bytes]], bool]]]] = [
        ("add a set element (key alone) + its mark, one transaction",
         [("once_ip", [(k, b"")], True), ("once_mark_ip", [(k, mark)], True)]),
        ("add the same set element again", [("once_ip", [(k, b"")], True)]),
        ("add the same map element, same value", [("once_mark_ip", [(k, mark)], True)]),
        ("add the same map element, another value",
         [("once_mark_ip", [(k, struct.pack("=I", MARK_KERNEL))], True)]),
        ("add a value to a set (not a map)", [("once_ip", [(key(CLIENT_ADDR, SERVER_ADDR, TCP, 65002),
                                                              mark)], True)]),
        ("delete the element", [("once_ip", [(k, b"")], False), ("once_mark_ip", [(k, b"")], False)]),
        ("delete it again (gone)", [("once_ip", [(k, b"")], False)]),
    ]
    out = [{"update": what, "answer": ", ".join(os.strerror(e) for e in w.transaction(msgs)) or "ok"}
           for what, msgs in cases]
    gone = w.transaction([], first=(destroy_message("once_mark_ip", [k], 99_999),))
    out.append({"update": "destroy it (NFT_MSG_DESTROYSETELEM, gone)",
                "answer": ", ".join(os.strerror(e) for e in gone) or "ok"})
    fw(tb, "nft", "add", "set", "inet", MAPS_TABLE, "full", "{ type ipv4_addr; flags timeout; size 2; }")
    try:
        errs = [w.transaction([("full", [(bytes([192, 0, 2, 100 + i]), b"")], True)]) for i in range(3)]
        out.append({"update": "add a third element to a set of size 2",
                    "answer": ", ".join(os.strerror(e) for e in errs[-1]) or "ok"})
    finally:
        fw(tb, "nft", "delete", "set", "inet", MAPS_TABLE, "full", check=False)
    return out


# -- 2. behaviour ------------------------------------------------------------------------------------

def _two(first: bool, second_refused: bool) -> str:
    return (f"first {'passed' if first else 'DROPPED'}, "
            f"second {'dropped' if second_refused else 'PASSED'}")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def s1_counter(tb: Testbed, match: str) -> Callable[[], int]:
    """s1 drops (and counts) what ``match`` matches (SYNs: c1's SYN is never answered, so
    it is retransmitted on the same connection)."""
    tb.run(SERVER, ["nft", "-f", "-"], input=(
        "table inet kg_s1 {\n chain in {\n  type filter hook input priority 0; policy accept;\n"
        f"  {match} counter drop\n }}\n}}\n"))

    def count() -> int:
        text = tb.run(SERVER, ["nft", "list", "table", "inet", "kg_s1"]).stdout
        return int(text.split("counter packets ")[1].split()[0])
    return count


def behaviour(tb: Testbed, w: GrantWriter, listener_port: int) -> list[Check]:
    """Real connections through the grant chain and the enforcer-like FORWARD chain."""
    checks: list[Check] = []
    p = listener_port

    def refused(addr: str, port: int) -> bool:
        return not connect_once(tb, addr, port, REFUSED_WAIT)

    k4 = key(CLIENT_ADDR, SERVER_ADDR, TCP, p)
    k6 = key(CLIENT6, SERVER6, TCP, p)
    checks.append(Check("no grant: the SYN is dropped", refused(SERVER_ADDR, p),
                        "iptables NEW -> queue, no reader"))
    w.grant([k4])
    first, second = connect_once(tb, SERVER_ADDR, p, CONNECT_TIMEOUT), refused(SERVER_ADDR, p)
    left = fw(tb, "nft", "list", "set", "inet", MAPS_TABLE, "once_ip").stdout.count("192.0.2.11")
    checks.append(Check("single use: the first connection passes, the next is dropped", first and second,
                        f"{_two(first, second)}, "
                        f"{left} element(s) left in once_ip; so the iptables chain (priority 0) saw the "
                        f"mark the nft chain (priority {PRIORITY}) set"))
    # The per-element limit alone (a set without the delete) admits one packet of one flow.
    fw(tb, "nft", "add", "set", "inet", MAPS_TABLE, "limit_only", f"{{ type {T4}; {ONE_PACKET}; }}")
    fw(tb, "nft", "insert", "rule", "inet", MAPS_TABLE, "grants", "ct state new", K4, "@limit_only",
       "ct mark set", hex(GRANT_MARK))
    w.transaction([("limit_only", [(k4, b"")], True)])
    shown = fw(tb, "nft", "list", "set", "inet", MAPS_TABLE, "limit_only").stdout.split("elements")[-1]
    first, second = connect_once(tb, SERVER_ADDR, p, CONNECT_TIMEOUT), refused(SERVER_ADDR, p)
    chain = fw(tb, "nft", "-a", "list", "chain", "inet", MAPS_TABLE, "grants").stdout
    handle = next(line.split("# handle ")[1] for line in chain.splitlines() if "@limit_only" in line)
    fw(tb, "nft", "delete", "rule", "inet", MAPS_TABLE, "grants", "handle", handle.strip())
    fw(tb, "nft", "delete", "set", "inet", MAPS_TABLE, "limit_only")
    templated = "limit rate" in shown
    checks.append(Check(f"per-element '{ONE_PACKET}' (set template), no delete: one flow only",
                        first and second and templated,
                        f"{_two(first, second)}; the element added over netlink got the template: "
                        f"{'yes' if templated else 'NO'}"))
    w.grant([key(CLIENT_ADDR, SERVER_ADDR, TCP, p)], kind="single")
    first, second = connect_once(tb, SERVER_ADDR, p, CONNECT_TIMEOUT), refused(SERVER_ADDR, p)
    checks.append(Check("IPv4 one-map shape: mark from the map, element deleted", first and second,
                        f"{_two(first, second)}"))
    w.grant([k6], proto="ip6")
    first, second = connect_once(tb, SERVER6, p, CONNECT_TIMEOUT), refused(SERVER6, p)
    checks.append(Check("IPv6 single use (set + mark map)", first and second,
                        f"{_two(first, second)}"))
    w.grant([key(CLIENT_ADDR, SERVER_ADDR, TCP, p, "int1")], kind="once_if")
    wrong = refused(SERVER_ADDR, p)
    w.grant([key(CLIENT_ADDR, SERVER_ADDR, TCP, p, INTERNAL_IF)], kind="once_if")
    right = connect_once(tb, SERVER_ADDR, p, CONNECT_TIMEOUT)
    checks.append(Check("interface in the key: only the right ingress interface matches", wrong and right,
                        f"element for int1: {'dropped' if wrong else 'PASSED'}; for {INTERNAL_IF}: "
                        f"{'passed' if right else 'DROPPED'}"))
    w.transaction([("once_if_ip", [(key(CLIENT_ADDR, SERVER_ADDR, TCP, p, "int1"), b"")], False)])
    w.grant([k4], single_use=False)
    n = sum(connect_once(tb, SERVER_ADDR, p, CONNECT_TIMEOUT) for _ in range(3))
    w.transaction([("multi_mark_ip", [(k4, b"")], False)])
    after = refused(SERVER_ADDR, p)
    checks.append(Check("ALLOW_MULTIPLE (map element, no delete): each connection passes until removed",
                        n == 3 and after, f"{n}/3 passed; after the element was deleted: "
                        f"{'dropped' if after else 'PASSED'}"))
    w.grant([k4], timeout_ms=100)
    time.sleep(0.3)
    expired = refused(SERVER_ADDR, p)
    checks.append(Check("element timeout (100 ms, per element): expired grant drops the SYN", expired,
                        "dropped" if expired else "PASSED"))

    # A retransmitted SYN: the same connection, still ct state new, element already gone.
    q = p + 1
    syns = s1_counter(tb, f"tcp dport {q} tcp flags syn")
    try:
        kq = key(CLIENT_ADDR, SERVER_ADDR, TCP, q)
        w.grant([kq])
        connect_once(tb, SERVER_ADDR, q, 1.5)  # the kernel resends the SYN after 1 s
        through = syns()
        marks = [line for line in fw(tb, "conntrack", "-L", "-p", "tcp", "--dport", str(q),
                                     check=False).stdout.splitlines() if "SYN_SENT" in line]
        connect_once(tb, SERVER_ADDR, q, REFUSED_WAIT)  # a new connection: new conntrack entry
        later = syns() - through
        mark = (f"0x{int(marks[0].split('mark=')[1].split()[0]):08x}" if marks and "mark=" in marks[0]
                else "?")
        checks.append(Check("retransmitted SYN of the admitted connection passes (conntrack mark); "
                            "a new connection does not", through >= 2 and later == 0,
                            f"SYNs reaching s1: {through} of the first connection (its entry: "
                            f"mark={mark}, ct state still new), {later} of the next"))
    finally:
        tb.run(SERVER, ["nft", "delete", "table", "inet", "kg_s1"], check=False)

    # UDP: conntrack calls every datagram of the flow new until the target answers.
    syns = s1_counter(tb, f"udp dport {q}")
    try:
        w.grant([key(CLIENT_ADDR, SERVER_ADDR, socket.IPPROTO_UDP, q)])
        with netns(tb.netns(CLIENT)):
            a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET,
                                                                                  socket.SOCK_DGRAM)
        with a, b:
            for _ in range(3):
                a.sendto(b"x", (SERVER_ADDR, q))
            b.sendto(b"y", (SERVER_ADDR, q))
            time.sleep(0.2)
        got = syns()
        checks.append(Check("UDP single use: the flow's later datagrams (still ct state new) pass by "
                            "the mark; another flow's do not", got == 3,
                            f"{got} datagrams reached s1 (3 from the granted flow, 1 sent from another "
                            "port)"))
    finally:
        tb.run(SERVER, ["nft", "delete", "table", "inet", "kg_s1"], check=False)

    # Hook order: the same chain after the iptables one does not admit anything.
    fw(tb, "nft", "delete", "chain", "inet", MAPS_TABLE, "grants")
    fw(tb, "nft", "-f", "-", input="\n".join(
        line for line in render_grants(None, priority="filter + 1").splitlines()
        if not line.strip().startswith(("set ", "map "))) + "\n")
    w.grant([k4])
    late = refused(SERVER_ADDR, p)
    checks.append(Check("the same chain at priority filter + 1 (after iptables' FORWARD) admits nothing",
                        late, "dropped: the iptables chain decided first" if late else "PASSED"))
    return checks


# -- 3. latency ---------------------------------------------------------------------------------------

@dataclass
class Run:
    connect_us: list[float] = field(default_factory=list)
    grant_us: list[float] = field(default_factory=list)
    failed: int = 0
    # (source port, destination port, monotonic ns at connect(), at its return)
    flows: list[tuple[int, int, int, int]] = field(default_factory=list)
    listener: dict[str, Any] | None = None
    error: str | None = None


def pasv_connects(tb: Testbed, count: int, grant: Callable[[int], None] | None, gap: float = 0.0) -> Run:
    """One FTP control connection from c1 to s1:21; ``count`` times: PASV, the 227, then
    (``grant``: a grant for the announced port, timed), ``gap`` seconds, and the timed data
    connect()."""
    run = Run()
    with netns(tb.netns(CLIENT)):
        ctl = socket.create_connection((SERVER_ADDR, 21), timeout=CONNECT_TIMEOUT)
        data = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    buf = bytearray()
    try:
        ctl.settimeout(CONNECT_TIMEOUT + 2)
        _read_reply(ctl, buf)  # 220
        for s in data:
            ctl.sendall(b"PASV\r\n")
            m = PASV_RE.search(_read_reply(ctl, buf))
            if m is None:
                raise RuntimeError("no 227 reply to PASV")
            port = int(m.group(5)) * 256 + int(m.group(6))
            if grant is not None:
                t = time.perf_counter_ns()
                grant(port)
                run.grant_us.append((time.perf_counter_ns() - t) / 1000)
            if gap:
                time.sleep(gap)
            s.settimeout(CONNECT_TIMEOUT)
            t0 = time.monotonic_ns()
            try:
                s.connect((SERVER_ADDR, port))
                t1 = time.monotonic_ns()
                run.connect_us.append((t1 - t0) / 1000)
                run.flows.append((s.getsockname()[1], port, t0, t1))
            except OSError:
                run.failed += 1
            finally:
                s.close()
        ctl.sendall(b"QUIT\r\n")
    finally:
        ctl.close()
        for s in data:
            s.close()
    return run


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    notify: str | None = None  # "nflog" or "ctevents"
    listen_args: tuple[str, ...] = ()
    log: bool = False  # the rules log (with notify "nflog" too)
    kernel_grant: bool = False
    grant_kind: str = "once"  # "once", "single" (IPv4 one map), "miss" (a grant the SYN does not match)
    nfqueue: bool = False
    helper: bool = False


CONFIGS = [
    Config("plain", "plain forwarding (no rules)"),
    Config("helper", "conntrack FTP helper: RELATED expectation (bench HELPER_RULES)", helper=True),
    Config("kgrant", "kernel grant (set + mark map), no notification", kernel_grant=True),
    Config("grant-tx-only", "no filtering rules; the grant table, and a grant before each connect() "
           "that the SYN does not match (UDP): what the transaction itself costs the next SYN",
           kernel_grant=True, grant_kind="miss"),
    Config("kgrant-log-unread", "kernel grant + log group, nobody bound to the group", log=True,
           kernel_grant=True),
    Config("kgrant-nflog", "kernel grant + log group -> NFLOG listener, each notice sent at once",
           "nflog", ("--qthresh", "1"), kernel_grant=True),
    Config("kgrant-nflog-10ms", "kernel grant + NFLOG, notices batched (100 or 10 ms)", "nflog",
           ("--qthresh", str(NFULNL_QTHRESH_DEFAULT), "--flush-ms", "10"), kernel_grant=True),
    Config("kgrant-ctev", "kernel grant + ctnetlink NEW events (mark filter in BPF)", "ctevents",
           kernel_grant=True),
    Config("kgrant-map", "kernel grant, IPv4 one map (mark + delete), NFLOG at once", "nflog",
           ("--qthresh", "1"), kernel_grant=True, grant_kind="single"),
    Config("nfqueue", "Python NFQUEUE consumer decides the SYN (bench.consumers, NetfilterQueue)",
           nfqueue=True),
]


def measure(tb: Testbed, cfg: Config, count: int, group: int, w: GrantWriter, gap: float = 0.0) -> Run:
    rules = Rules(tb)
    listener: Process | None = None
    consumer: Process | None = None
    run = Run()
    try:
        grant: Callable[[int], None] | None = None
        if cfg.helper:
            from bench.__main__ import HELPER_RULES

            for table, spec in HELPER_RULES:
                rules.iptables(table, spec[1], [spec[2:]])
        if cfg.nfqueue:
            consumer = Process(tb, FW, ["-m", "bench.consumers", "--binding", "netfilterqueue",
                                        "--queue", str(CONSUMER_QUEUE)])
            rules.iptables("filter", "FORWARD", [
                ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                ["-j", "NFQUEUE", "--queue-num", str(CONSUMER_QUEUE)]])
        if cfg.kernel_grant:
            rules.nft(render_grants(group if cfg.notify == "nflog" or cfg.log else None))
            if cfg.grant_kind != "miss":
                rules.iptables("filter", "FORWARD", ENFORCER_FORWARD)
            if cfg.notify is not None:
                listener = Process(tb, FW, ["-m", "bench.kernel_grants", "listen", "--mode", cfg.notify,
                                            "--group", str(group), *cfg.listen_args])
            # the control connection: an ALLOW_MULTIPLE grant
            w.grant([key(CLIENT_ADDR, SERVER_ADDR, TCP, 21)], single_use=False, timeout_ms=None)

            def grant_port(port: int) -> None:
                if cfg.grant_kind == "miss":
                    w.grant([key(CLIENT_ADDR, SERVER_ADDR, socket.IPPROTO_UDP, port)])
                else:
                    w.grant([key(CLIENT_ADDR, SERVER_ADDR, TCP, port)], kind=cfg.grant_kind)
            grant = grant_port
        fw(tb, "conntrack", "-F", check=False)
        run = pasv_connects(tb, count, grant, gap)
    except Exception as exc:
        run.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        if listener is not None:
            time.sleep(0.1)  # what the kernel still holds back (batched NFLOG) reaches it
            run.listener = listener.stop()
        if consumer is not None:
            consumer.stop()
        rules.close()
    return run


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def notices(runs: list[Run]) -> dict[str, Any] | None:
    """How many admitted data connections the listener heard of, and how long after the
    connect() began (and whether before it returned)."""
    lats: list[float] = []
    expected = heard = early = others = enobufs = 0
    cpu = 0.0
    wakeups = 0
    any_listener = False
    for r in runs:
        if r.listener is None:
            continue
        any_listener = True
        got = {(s, d): t for s, d, t in r.listener.get("seen", [])}
        for sport, dport, t0, t1 in r.flows:
            expected += 1
            t = got.get((sport, dport))
            if t is not None:
                heard += 1
                lats.append((t - t0) / 1000)
                early += t <= t1
        others += r.listener.get("others", 0)
        enobufs += r.listener.get("enobufs", 0)
        cpu += r.listener.get("cpu_s", 0.0)
        wakeups += r.listener.get("wakeups", 0)
    if not any_listener:
        return None
    return {"expected": expected, "heard": heard, "median_us": pct(lats, 0.5), "p90_us": pct(lats, 0.9),
            "before_connect_returned": early, "others": others, "enobufs": enobufs,
            "cpu_us_per_notice": cpu * 1e6 / heard if heard else None, "wakeups": wakeups}


# -- 4. costs --------------------------------------------------------------------------------------------

def costs(tb: Testbed, w: GrantWriter, n: int = 2000) -> dict[str, Any]:
    """Grant and delete round trips over netlink, one at a time and in batches, and the
    kernel memory of 100k pending grants (rough: /proc/meminfo's Slab is machine-wide)."""
    fw(tb, "nft", "-f", "-", input=render_grants(None))
    try:
        keys = [key(CLIENT_ADDR, f"198.51.100.{i // 60000 + 1}", TCP, 1024 + i % 60000)
                for i in range(100_000)]
        one = []
        for k in keys[:n]:
            t = time.perf_counter_ns()
            w.grant([k])
            one.append((time.perf_counter_ns() - t) / 1000)
        dele = []
        for k in keys[:n]:
            t = time.perf_counter_ns()
            w.transaction([("once_ip", [(k, b"")], False), ("once_mark_ip", [(k, b"")], False)])
            dele.append((time.perf_counter_ns() - t) / 1000)
        slab0 = _slab_kb()
        t = time.perf_counter_ns()
        for i in range(0, len(keys), 1000):
            w.grant(keys[i:i + 1000], timeout_ms=600_000)
        batched = (time.perf_counter_ns() - t) / 1000 / len(keys)
        slab1 = _slab_kb()
        return {"grant_us": pct(one, 0.5), "grant_p90_us": pct(one, 0.9), "delete_us": pct(dele, 0.5),
                "batched_grant_us": batched, "pending": len(keys),
                "slab_bytes_per_grant": (slab1 - slab0) * 1024 / len(keys)}
    finally:
        fw(tb, "nft", "delete", "table", "inet", MAPS_TABLE, check=False)


def _slab_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


# -- main ------------------------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def latency_table(samples: dict[str, list[Run]], configs: list[Config]) -> tuple[str, list[dict[str, Any]]]:
    pooled = {c.name: [x for r in samples[c.name] for x in r.connect_us] for c in configs}
    base_med, base_p90 = pct(pooled["helper"], 0.5), pct(pooled["helper"], 0.9)
    rows, out = [], []
    for c in configs:
        runs = samples[c.name]
        med, p90 = pct(pooled[c.name], 0.5), pct(pooled[c.name], 0.9)
        grants = [x for r in runs for x in r.grant_us]
        n = notices(runs)
        failed = sum(r.failed for r in runs)
        errors = sorted({r.error for r in runs if r.error})
        note = (f"{n['heard']}/{n['expected']} heard, {_fmt(n['median_us'], '.0f')}/"
                f"{_fmt(n['p90_us'], '.0f')} µs "
                f"after connect() began, {n['before_connect_returned']} before it returned; "
                f"listener {_fmt(n['cpu_us_per_notice'], '.0f')} µs CPU/notice, {n['wakeups']} wakeups"
                + (f", {n['others']} other events" if n["others"] else "")
                + (f", {n['enobufs']} ENOBUFS" if n["enobufs"] else "")) if n else ""
        per_rep = [pct(r.connect_us, 0.5) for r in runs]
        paired = [a / b for a, b in zip(per_rep, (pct(r.connect_us, 0.5) for r in samples["helper"]),
                                        strict=True) if a and b]
        spread = f"{min(paired):.2f}-{max(paired):.2f}" if paired else "-"
        entry: dict[str, Any] = {"name": c.name, "label": c.label, "median_us": med, "p90_us": p90,
                 "x_helper": med / base_med if med and base_med else None,
                 "p90_x_helper": p90 / base_p90 if p90 and base_p90 else None,
                 "ok": len(pooled[c.name]), "failed": failed, "grant_median_us": pct(grants, 0.5),
                 "per_rep_median_us": per_rep, "per_rep_x_helper": paired, "notices": n,
                 "errors": errors}
        out.append(entry)
        rows.append((c.name, _fmt(med), _fmt(p90), _fmt(entry["x_helper"], ".2f"),
                     _fmt(entry["p90_x_helper"], ".2f"), spread, f"{len(pooled[c.name])}/{failed}",
                     _fmt(entry["grant_median_us"]), "; ".join(x for x in (note, *errors) if x)))
    head = ("config", "median µs", "p90 µs", "x helper", "p90 x helper", "per-run x", "ok/failed",
            "grant µs", "notifications")
    return format_table(head, rows), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    li = sub.add_parser("listen", help="(internal) the notification reader, run inside fw")
    li.add_argument("--mode", choices=["nflog", "ctevents"], required=True)
    li.add_argument("--group", type=int, default=7)
    li.add_argument("--qthresh", type=int, default=1, help="NFLOG: send once this many wait")
    li.add_argument("--flush-ms", type=int, default=10, help="NFLOG: or this long after the first")
    li.add_argument("--no-filter", action="store_true", help="ctevents: no BPF mark filter")
    ap.add_argument("--count", type=int, default=100, help="data connections per run (default 100)")
    ap.add_argument("--reps", type=int, default=10, help="runs of each configuration, round-robin "
                    "(default 10: short runs spread the machine's other load over all of them)")
    ap.add_argument("--group", type=int, default=7, help="NFLOG group")
    ap.add_argument("--only", nargs="+", choices=[c.name for c in CONFIGS],
                    help="latency configurations to measure (the helper baseline always is)")
    ap.add_argument("--skip", nargs="+", choices=["shapes", "behaviour", "costs"], default=[],
                    help="leave out these parts")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="pause between the 227 (and the grant) and the data connect() (default 0)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.cmd == "listen":
        return listen(args)
    if os.geteuid() != 0:
        print("bench.kernel_grants needs root (network namespaces, nft)", file=sys.stderr)
        return 2

    owner = os.getpid()

    def on_term(_signum: int, _frame: object) -> None:
        if os.getpid() != owner:  # a child forked by pyroute2 (it stops them with SIGTERM)
            os._exit(143)
        raise KeyboardInterrupt  # unwinds through the finally blocks: everything is taken down

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    from bench.__main__ import FlowServer

    configs = [c for c in CONFIGS if args.only is None or c.name in args.only or c.name == "helper"]
    tb = Testbed.up(standard("routed"), tag="kgrant")
    server: FlowServer | None = None
    result: dict[str, Any] = {"bench": "kernel grants", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
                              "nft": subprocess.run(["nft", "--version"], capture_output=True, text=True,
                                                    check=False).stdout.strip(),
                              "method": {"count": args.count, "reps": args.reps, "gap_ms": args.gap_ms,
                                         "configs": {c.name: c.label for c in configs}}}
    try:
        server = FlowServer(tb)
        server.start()
        with netns(tb.netns(FW)):
            w = GrantWriter()
        try:
            run_parts(tb, w, args, configs, result)
        finally:
            w.close()
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        tb.down()
    if "costs" in result:
        cost = result["costs"]
        print(format_table(("cost", "value"), [
            ("one grant (set + mark map elements, one transaction, ACK)",
             f"{_fmt(cost['grant_us'])} µs median, {_fmt(cost['grant_p90_us'])} p90"),
            ("one delete (both elements)", f"{_fmt(cost['delete_us'])} µs median"),
            ("batched grants (1000 a transaction)", f"{_fmt(cost['batched_grant_us'], '.2f')} µs a grant"),
            (f"kernel memory, {cost['pending']:,} pending grants",
             f"~{_fmt(cost['slab_bytes_per_grant'], '.0f')} B a grant (Slab growth, machine-wide)")]))
    print("\n" + result.pop("table_text"))
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    result["load_average"] = {"start": load0, "end": os.getloadavg()}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    out = args.out.relative_to(Path.cwd()) if args.out.is_relative_to(Path.cwd()) else args.out
    print(f"\n{result['wall_seconds']} s; written to {out}; ratios: median against the helper's median "
          "(and p90 against its p90), all pooled over the runs; per-run x: each run's median against "
          f"the helper run's of the same round; load average {load0[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    return 0


def run_parts(tb: Testbed, w: GrantWriter, args: argparse.Namespace, configs: list[Config],
              result: dict[str, Any]) -> None:
    """The four parts, in order, into ``result`` (printed as they finish)."""
    if "shapes" not in args.skip:
        print("1. rule shapes (nft -c in fw)", flush=True)
        result["shapes"] = probe_shapes(tb)
        print(format_table(("shape", "ok", "error"),
                           [(s["shape"], s["ok"], s["error"]) for s in result["shapes"]]), flush=True)
        fw(tb, "nft", "-f", "-", input=render_grants(args.group))
        try:
            result["elements"] = probe_elements(tb, w)
        finally:
            fw(tb, "nft", "delete", "table", "inet", MAPS_TABLE, check=False)
        print(format_table(("element update over netlink", "kernel's answer"),
                           [(e["update"], e["answer"]) for e in result["elements"]]), flush=True)

    if "behaviour" not in args.skip:
        print("\n2. behaviour (c1 -> fw -> s1, sink on s1:6000)", flush=True)
        rules = Rules(tb)
        try:
            rules.iptables("filter", "FORWARD", ENFORCER_FORWARD, ("iptables", "ip6tables"))
            fw(tb, "nft", "-f", "-", input=render_grants(args.group))
            checks = behaviour(tb, w, 6000)
        finally:
            rules.close()
            fw(tb, "nft", "delete", "table", "inet", MAPS_TABLE, check=False)
        result["behaviour"] = [vars(c) for c in checks]
        print(format_table(("check", "ok", "detail"),
                           [(c.name, "yes" if c.ok else "NO", c.detail) for c in checks]), flush=True)

    print(f"\n3. first-SYN latency: {args.count} PASV + data connect() per run, {args.reps} runs "
          "round-robin", flush=True)
    samples: dict[str, list[Run]] = {c.name: [] for c in configs}
    for rep in range(args.reps):
        for c in configs:
            samples[c.name].append(measure(tb, c, args.count, args.group, w, args.gap_ms / 1000))
        print(f"[{rep + 1}/{args.reps}] median µs: " + ", ".join(
            f"{c.name} {_fmt(pct(samples[c.name][-1].connect_us, 0.5), '.0f')}"
            + (f" ({samples[c.name][-1].error})" if samples[c.name][-1].error else "")
            for c in configs), flush=True)
    text, rows = latency_table(samples, configs)
    result["latency"] = rows
    result["table"] = text.splitlines()
    result["table_text"] = text
    result["samples"] = {k: [vars(r) for r in v] for k, v in samples.items()}

    if "costs" not in args.skip:
        print("\n4. costs (netlink round trips from a process in the host, socket in fw)", flush=True)
        result["costs"] = costs(tb, w)


if __name__ == "__main__":
    sys.exit(main())
