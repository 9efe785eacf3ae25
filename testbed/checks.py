"""ptf-style packet checks that explain themselves when they fail.

A *template* is one of:

- a Scapy packet: it matches a packet when every layer of the template is
  present in the packet (same class, in the same order, other layers may sit in
  between) and every field explicitly set in the template's layer
  (``layer.fields``, not defaults; ``None`` means "any") equals the packet's value;
- a Scapy packet class (``TCP``): the packet has such a layer;
- any other callable ``pkt -> bool``: a predicate.

A failed check raises :class:`CheckFailed` (an ``AssertionError``) whose message
shows what was expected, what arrived instead on that interface, a field-by-field
comparison with the closest candidate, and the current pcap if there is one.

A *sniffer* is anything with ``packets() -> list[Packet]``; ``label`` (or ``iface``)
names where it listens (``testbed.agent.Sniffer`` has both).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from scapy.packet import NoPayload, Packet

from testbed import timeouts

__all__ = [
    "CheckFailed",
    "FieldComparison",
    "compare",
    "current_pcap",
    "expect_no_packet",
    "expect_nothing_else",
    "expect_packet",
    "is_noise",
    "matches",
    "set_current_pcap",
]

Template = Packet | type[Packet] | Callable[[Packet], bool]

# How often a waiting check asks the sniffer for new packets.
POLL_INTERVAL = 0.02
# At most this many packets are listed in a failure message.
MAX_LISTED = 40


class CheckFailed(AssertionError):
    """A packet check failed; the message explains what was expected and what came."""


class SnifferLike(Protocol):
    def packets(self) -> list[Any]: ...


# -- the "current capture" hook (set per test by the pytest plugin) ----------------

_current_pcap: str | None = None


def set_current_pcap(path: str | None) -> None:
    """Record the pcap of the running test (or None) so failures can point to it."""
    global _current_pcap
    _current_pcap = None if path is None else str(path)


def current_pcap() -> str | None:
    return _current_pcap


# -- matching -------------------------------------------------------------------------


def _layers(pkt: Packet) -> list[Packet]:
    out = []
    layer: Packet = pkt
    while not isinstance(layer, NoPayload):
        out.append(layer)
        layer = layer.payload
    return out


def _align(template: Packet, pkt: Packet) -> list[tuple[Packet, Packet | None]]:
    """Pair each template layer with the packet layer of the same class, in order."""
    plist = _layers(pkt)
    pos = 0
    pairs: list[tuple[Packet, Packet | None]] = []
    for tl in _layers(template):
        found = None
        for j in range(pos, len(plist)):
            if type(plist[j]) is type(tl):
                found = plist[j]
                pos = j + 1
                break
        pairs.append((tl, found))
    return pairs


def _set_fields(layer: Packet) -> list[str]:
    """Fields the template sets. ``None`` means "any"; Scapy copies the defaults of
    list fields (e.g. ``IP.options``) into ``fields``, so a list field still at its
    default counts as not set."""
    names = []
    for name, value in layer.fields.items():
        if value is None:
            continue
        try:
            fld = layer.get_field(name)
        except Exception:
            fld = None
        if (fld is not None and (getattr(fld, "islist", False) or fld.holds_packets)
                and value == fld.default):
            continue
        names.append(name)
    return names


def _field_equal(tl: Packet, pl: Packet, name: str) -> bool:
    tv = tl.getfieldval(name)
    try:
        pv = pl.getfieldval(name)
    except AttributeError:
        return False
    try:
        if tv == pv:
            return True
    except Exception:
        pass
    # Compare in wire form too, so "2001:DB8::1" equals "2001:db8::1".
    try:
        fld = tl.get_field(name)
        return bool(fld.i2m(tl, tv) == fld.i2m(pl, pv))
    except Exception:
        return False


def _field_repr(layer: Packet, name: str) -> str:
    try:
        value = layer.getfieldval(name)
    except AttributeError:
        return "<no such field>"
    try:
        text = str(layer.get_field(name).i2repr(layer, value))
    except Exception:
        text = repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and text != str(value):
        try:
            if text != str(int(value)) and not text.startswith("0x"):
                text = f"{text} ({int(value)})"
        except (TypeError, ValueError):
            pass
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class FieldComparison:
    layer: str
    field: str
    expected: str
    got: str
    ok: bool


def compare(template: Packet, pkt: Packet) -> list[FieldComparison]:
    """Field-by-field comparison of every explicitly set template field with ``pkt``."""
    rows = []
    for tl, pl in _align(template, pkt):
        names = _set_fields(tl)
        lname = type(tl).__name__
        if pl is None:
            if not names:
                rows.append(FieldComparison(lname, "(layer)", "present", "<layer missing>", False))
            for name in names:
                rows.append(
                    FieldComparison(lname, name, _field_repr(tl, name), "<layer missing>", False)
                )
            continue
        for name in names:
            rows.append(
                FieldComparison(
                    lname, name, _field_repr(tl, name), _field_repr(pl, name),
                    _field_equal(tl, pl, name),
                )
            )
    return rows


def matches(template: Template, pkt: Packet) -> bool:
    """True if ``pkt`` matches ``template`` (a packet, a packet class or a predicate)."""
    if isinstance(template, Packet):
        for tl, pl in _align(template, pkt):
            if pl is None:
                return False
            for name in _set_fields(tl):
                if not _field_equal(tl, pl, name):
                    return False
        return True
    if isinstance(template, type) and issubclass(template, Packet):
        return pkt.haslayer(template) > 0
    if callable(template):
        predicate: Callable[[Packet], Any] = template
        return bool(predicate(pkt))
    raise TypeError(f"not a template: {template!r} (want a Scapy packet, class or callable)")


def _noise_classes() -> tuple[type[Packet], ...]:
    from scapy.layers import inet6
    from scapy.layers.l2 import ARP

    names = [
        "ICMPv6ND_NS", "ICMPv6ND_NA", "ICMPv6ND_RS", "ICMPv6ND_RA", "ICMPv6ND_Redirect",
        "ICMPv6MLQuery", "ICMPv6MLReport", "ICMPv6MLDone", "ICMPv6MLQuery2", "ICMPv6MLReport2",
    ]
    return (ARP, *(getattr(inet6, n) for n in names if hasattr(inet6, n)))


_NOISE: tuple[type[Packet], ...] | None = None


def is_noise(pkt: Packet) -> bool:
    """ARP, IPv6 neighbour/router discovery and MLD: traffic the kernel makes by itself."""
    global _NOISE
    if _NOISE is None:
        _NOISE = _noise_classes()
    return any(pkt.haslayer(cls) for cls in _NOISE)


# -- failure messages ---------------------------------------------------------------------


def _where(sniffer: Any) -> str:
    label = getattr(sniffer, "label", None)
    if label:
        return str(label)
    iface = getattr(sniffer, "iface", None)
    return f"interface {iface}" if iface else repr(sniffer)


def _set_summary(template: Packet) -> str:
    parts = [
        f"{type(tl).__name__}.{n}={_field_repr(tl, n)}"
        for tl in _layers(template) for n in _set_fields(tl)
    ]
    layers = " / ".join(type(tl).__name__ for tl in _layers(template))
    return f"{layers}; fields: " + (", ".join(parts) if parts else "(none: layers only)")


def _describe_template(template: Template) -> str:
    if isinstance(template, Packet):
        return (f"matching on {_set_summary(template)}\n"
                + str(template.show(dump=True)).rstrip())
    if isinstance(template, type) and issubclass(template, Packet):
        return f"any packet with a {template.__name__} layer"
    doc = (getattr(template, "__doc__", None) or "").strip().splitlines()
    name = getattr(template, "__name__", repr(template))
    return f"a packet for which {name}() is true" + (f" ({doc[0]})" if doc else "")


def _summary(pkt: Packet) -> str:
    try:
        return str(pkt.summary())
    except Exception as exc:
        return f"<unprintable packet: {exc}>"


def _list_packets(pkts: Sequence[Packet], marks: dict[int, str] | None = None) -> list[str]:
    if not pkts:
        return ["  (nothing)"]
    t0 = float(getattr(pkts[0], "time", 0.0) or 0.0)
    lines = []
    for i, p in enumerate(pkts[:MAX_LISTED]):
        dt = float(getattr(p, "time", t0) or t0) - t0
        mark = (marks or {}).get(i, "")
        lines.append(f"  [{i}] +{dt:.3f}s {_summary(p)}{mark}")
    if len(pkts) > MAX_LISTED:
        lines.append(f"  ... and {len(pkts) - MAX_LISTED} more")
    return lines


def _diff_table(rows: list[FieldComparison]) -> list[str]:
    header = ("field", "expected", "got")
    cells = [(f"{r.layer}.{r.field}", r.expected, r.got) for r in rows]
    w0 = max(len(header[0]), *(len(c[0]) for c in cells)) if cells else len(header[0])
    w1 = max(len(header[1]), *(len(c[1]) for c in cells)) if cells else len(header[1])
    lines = [f"    {header[0]:<{w0}}  {header[1]:<{w1}}  {header[2]}"]
    for r, c in zip(rows, cells, strict=True):
        flag = "  " if r.ok else "!="
        lines.append(f"  {flag}{c[0]:<{w0}}  {c[1]:<{w1}}  {c[2]}")
    return lines


def _closest(template: Packet, pkts: Sequence[Packet]) -> tuple[int, list[FieldComparison]]:
    best_i, best_rows, best_score = -1, [], -1
    for i, p in enumerate(pkts):
        rows = compare(template, p)
        score = sum(r.ok for r in rows)
        if score > best_score:
            best_i, best_rows, best_score = i, rows, score
    return best_i, best_rows


def _pcap_line() -> str:
    path = current_pcap()
    return f"pcap: {path}" if path else "pcap: (no capture recorded for this test)"


def _fail_message(
    check: str,
    problem: str,
    sniffer: Any,
    template: Template,
    pkts: Sequence[Packet],
) -> str:
    lines = [f"{check}: {problem}", f"on {_where(sniffer)}", "", "expected:"]
    lines += ["  " + ln for ln in _describe_template(template).splitlines()]
    lines += ["", f"arrived instead ({len(pkts)} packet{'s' if len(pkts) != 1 else ''}):"]
    if isinstance(template, Packet) and pkts:
        i, rows = _closest(template, pkts)
        lines += _list_packets(pkts, {i: "   <- closest"})
        n_ok = sum(r.ok for r in rows)
        lines += ["", f"closest candidate [{i}] ({n_ok} of {len(rows)} set fields match):"]
        lines += _diff_table(rows)
    else:
        lines += _list_packets(pkts)
    lines += ["", _pcap_line()]
    return "\n".join(lines)


# -- the checks ---------------------------------------------------------------------------


def expect_packet(sniffer: SnifferLike, template: Template, *,
                  timeout: float | None = None) -> Packet:
    """Wait (up to ``timeouts.POSITIVE``) for a packet matching ``template``; return it.

    The first matching packet captured so far is returned, so calling this twice with
    the same template returns the same packet.
    """
    limit = timeouts.POSITIVE if timeout is None else timeout
    deadline = time.monotonic() + limit
    while True:
        last_round = time.monotonic() >= deadline
        pkts = sniffer.packets()
        for p in pkts:
            if matches(template, p):
                found: Packet = p
                return found
        if last_round:
            break
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
    raise CheckFailed(
        _fail_message("expect_packet", f"no matching packet arrived within {limit:g} s",
                      sniffer, template, pkts)
    )


def expect_no_packet(sniffer: SnifferLike, template: Template, *,
                     timeout: float | None = None) -> None:
    """Watch for ``timeouts.NEGATIVE`` seconds; fail as soon as a matching packet arrives."""
    limit = timeouts.NEGATIVE if timeout is None else timeout
    deadline = time.monotonic() + limit
    while True:
        last_round = time.monotonic() >= deadline
        pkts = sniffer.packets()
        hits = [i for i, p in enumerate(pkts) if matches(template, p)]
        if hits:
            i = hits[0]
            lines = [
                f"expect_no_packet: a packet matching the template arrived (within {limit:g} s)",
                f"on {_where(sniffer)}",
                "",
                "must not arrive:",
                *("  " + ln for ln in _describe_template(template).splitlines()),
                "",
                f"but packet [{i}] did:",
                *("  " + ln for ln in str(pkts[i].show(dump=True)).rstrip().splitlines()),
                "",
                f"all captured ({len(pkts)}):",
                *_list_packets(pkts, {h: "   <- matches" for h in hits}),
                "",
                _pcap_line(),
            ]
            raise CheckFailed("\n".join(lines))
        if last_round:
            _absence_relied_on(sniffer)
            return
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))


def _absence_relied_on(sniffer: SnifferLike) -> None:
    """A check passed on what ``sniffer`` did not show: tell a capture that can learn only
    later that it lost packets (``testbed.capture.FwPackets``), so that the loss fails it."""
    tell = getattr(sniffer, "absence_relied_on", None)
    if tell is not None:
        tell()


def expect_nothing_else(sniffer: SnifferLike, allowed: Iterable[Template], *,
                        ignore_noise: bool = True) -> None:
    """Fail if any packet captured so far matches none of ``allowed``.

    ARP, IPv6 neighbour/router discovery and MLD are ignored unless
    ``ignore_noise`` is False.
    """
    allowed = list(allowed)
    pkts = sniffer.packets()
    bad = [
        i for i, p in enumerate(pkts)
        if not (ignore_noise and is_noise(p)) and not any(matches(t, p) for t in allowed)
    ]
    if not bad:
        _absence_relied_on(sniffer)
        return
    lines = [
        f"expect_nothing_else: {len(bad)} unexpected packet{'s' if len(bad) != 1 else ''}",
        f"on {_where(sniffer)}",
        "",
        f"allowed ({len(allowed)} template{'s' if len(allowed) != 1 else ''}"
        f"{', plus ARP/ND/MLD noise' if ignore_noise else ''}):",
    ]
    for t in allowed:
        if isinstance(t, Packet):
            lines.append(f"  {_set_summary(t)}")
        else:
            lines.append("  " + _describe_template(t).splitlines()[0])
    lines += ["", f"captured ({len(pkts)}):"]
    lines += _list_packets(pkts, {i: "   <- unexpected" for i in bad})
    first = pkts[bad[0]]
    lines += ["", f"first unexpected packet [{bad[0]}]:"]
    lines += ["  " + ln for ln in str(first.show(dump=True)).rstrip().splitlines()]
    lines += ["", _pcap_line()]
    raise CheckFailed("\n".join(lines))
