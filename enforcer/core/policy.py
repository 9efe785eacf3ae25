"""Policy: protocol definitions, protocol rules, site and content rules, defaults.

A pure value built from already-parsed TOML data. Problems are reported as
``PolicyInvalid`` with the key path that is wrong; the config loader turns the
path into a file line.
"""

from __future__ import annotations

import ipaddress
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from enforcer.core.limits import MAXIMUM_COUNT, MAXIMUM_SECONDS
from enforcer.core.packet import TCP, UDP, IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
KeyPath = tuple[str | int, ...]

_IP_PROTOCOLS = {"tcp": TCP, "udp": UDP}


class PolicyInvalid(ValueError):
    def __init__(self, path: KeyPath, reason: str) -> None:
        super().__init__(f"{format_path(path)}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class NetworkSet:
    """Networks, tested by integer arithmetic: `address in networks` is on every decision."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._masks = tuple((n.version, int(n.netmask), int(n.network_address))
                            for n in self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetworkSet) and self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"NetworkSet({', '.join(map(str, self.networks))})"

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        version, value = address.version, int(address)
        return any(v == version and value & mask == net for v, mask, net in self._masks)


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class ProtocolDef:
    """A protocol definition: the primary connection's IP protocol and ports."""

    name: str
    guid: uuid.UUID
    ip_protocol: int
    ports: tuple[PortRange, ...]

    def matches(self, ip_protocol: int, port: int) -> bool:
        return ip_protocol == self.ip_protocol and any(port in r for r in self.ports)


@dataclass(frozen=True)
class ProtocolRule:
    """Which clients (networks, and users once authenticated) may use which protocols."""

    name: str
    allow: bool
    protocols: frozenset[str]
    clients: NetworkSet
    users: frozenset[str] | None  # None: any user, including unauthenticated SecureNAT

    def __post_init__(self) -> None:
        if not isinstance(self.clients, NetworkSet):
            object.__setattr__(self, "clients", NetworkSet(self.clients))

    def applies(self, protocol: str, client: IPAddress, user: str | None) -> bool:
        if protocol not in self.protocols or client not in self.clients:
            return False
        return self.users is None or (user is not None and user in self.users)


@dataclass(frozen=True)
class SiteRule:
    """Site and content rule: whether a destination network may be reached."""

    name: str
    allow: bool
    destinations: NetworkSet

    def __post_init__(self) -> None:
        if not isinstance(self.destinations, NetworkSet):
            object.__setattr__(self, "destinations", NetworkSet(self.destinations))


@dataclass(frozen=True)
class Defaults:
    permission_timeout: float = 60.0
    max_pending_per_session: int = 1024


@dataclass(frozen=True)
class Policy:
    protocols: tuple[ProtocolDef, ...] = ()
    protocol_rules: tuple[ProtocolRule, ...] = ()
    site_rules: tuple[SiteRule, ...] = ()
    defaults: Defaults = field(default_factory=Defaults)

    def primary_protocol(self, ip_protocol: int, port: int) -> ProtocolDef | None:
        """The protocol whose primary port this is, if any."""
        return next((p for p in self.protocols if p.matches(ip_protocol, port)), None)

    def protocol_rule(self, protocol: str, client: IPAddress,
                      user: str | None) -> ProtocolRule | None:
        """The first protocol rule that applies; no rule means deny."""
        return next((r for r in self.protocol_rules if r.applies(protocol, client, user)), None)

    def site_rule(self, destination: IPAddress) -> SiteRule | None:
        """The first site rule that covers the destination; no rule means deny."""
        return next((r for r in self.site_rules if destination in r.destinations), None)

    def protocol_verdict(self, protocol: str, client: IPAddress,
                         user: str | None) -> tuple[bool, str]:
        """Whether protocol rules let the client use the protocol, and the reason."""
        rule = self.protocol_rule(protocol, client, user)
        if rule is None:
            return False, f"no protocol rule lets {client} use {protocol}"
        if not rule.allow:
            return False, f"protocol rule '{rule.name}' denies {protocol} to {client}"
        return True, f"{protocol} allowed to {client} by rule '{rule.name}'"

    def destination_denial(self, destination: IPAddress) -> str | None:
        """Why site and content rules deny the destination, or None if they allow it."""
        site = self.site_rule(destination)
        if site is None:
            return f"destination {destination} denied: no site rule allows it"
        if not site.allow:
            return f"destination {destination} denied: site rule '{site.name}'"
        return None


# --- building a Policy from parsed TOML -------------------------------------------------

class Reader:
    """Typed access to parsed TOML that knows where it is, for error messages."""

    def __init__(self, data: Mapping[str, Any], path: KeyPath = ()) -> None:
        self.data = data
        self.path = path

    def fail(self, key: str | int | None, reason: str) -> PolicyInvalid:
        return PolicyInvalid(self.path if key is None else (*self.path, key), reason)

    def check_keys(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for key in self.data:
            if key not in allowed:
                raise self.fail(key, f"unknown key (expected one of {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(None, f"missing required key '{key}'")
            return default
        value = self.data[key]
        # bool is an int in Python; a policy that says `port = true` is a mistake.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML's nan and inf
            raise self.fail(key, f"must be a finite number, not {value}")
        return value

    def table(self, key: str) -> Reader:
        return Reader(self.get(key, dict, {}), (*self.path, key))

    def tables(self, key: str) -> list[Reader]:
        items = self.get(key, list, [])
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise PolicyInvalid((*self.path, key, i), "expected a table")
            out.append(Reader(item, (*self.path, key, i)))
        return out

    def strings(self, key: str, default: Any = ...) -> list[str]:
        values = self.get(key, list, default)
        if values is None:
            return []
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise PolicyInvalid((*self.path, key, i), f"expected a string, got {type(v).__name__}")
        return list(values)

    def networks(self, key: str) -> tuple[IPNetwork, ...]:
        out = []
        for i, text in enumerate(self.strings(key)):
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise PolicyInvalid((*self.path, key, i),
                                    f"'{text}' is not an IP address or network") from None
        return tuple(out)

    def action(self) -> bool:
        value = self.get("action", str)
        if value not in ("allow", "deny"):
            raise self.fail("action", f"must be 'allow' or 'deny', not '{value}'")
        return bool(value == "allow")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _port_ranges(reader: Reader) -> tuple[PortRange, ...]:
    ports = reader.get("ports", list)
    if not ports:
        raise reader.fail("ports", "a protocol needs at least one primary port")
    out = []
    for i, item in enumerate(ports):
        where = (*reader.path, "ports", i)
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and "-" in item:
            try:
                low, high = (int(x) for x in item.split("-", 1))
            except ValueError:
                raise PolicyInvalid(where, f"'{item}' is not a port range like '1024-2047'") from None
        else:
            raise PolicyInvalid(where, f"expected a port or a range 'LOW-HIGH', got {item!r}")
        if not 1 <= low <= high <= 65535:
            raise PolicyInvalid(where, f"port range {low}-{high} is outside 1-65535")
        out.append(PortRange(low, high))
    return tuple(out)


def policy_from_dict(data: Mapping[str, Any], extra_sections: Iterable[str] = ()) -> Policy:
    """Validate parsed TOML and build the Policy; raise PolicyInvalid on the first problem."""
    root = Reader(data)
    root.check_keys({"protocol", "protocol_rule", "site_rule", "defaults", *extra_sections})

    protocols: list[ProtocolDef] = []
    for r in root.tables("protocol"):
        r.check_keys({"name", "guid", "ip_protocol", "ports"})
        name = r.get("name", str)
        if not name.strip():
            raise r.fail("name", "a protocol needs a name")
        if any(p.name == name for p in protocols):
            raise r.fail("name", f"protocol '{name}' is defined twice")
        guid_text = r.get("guid", str)
        try:
            guid = uuid.UUID(guid_text)
        except ValueError:
            raise r.fail("guid", "not a GUID like 'xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx'") from None
        same = next((p for p in protocols if p.guid == guid), None)
        if same is not None:  # a grant names its protocol by GUID
            raise r.fail("guid", f"is protocol '{same.name}''s GUID too")
        ip_proto_name = r.get("ip_protocol", str)
        if ip_proto_name not in _IP_PROTOCOLS:
            raise r.fail("ip_protocol", f"must be 'tcp' or 'udp', not '{ip_proto_name}'")
        defined = ProtocolDef(name, guid, _IP_PROTOCOLS[ip_proto_name], _port_ranges(r))
        for other in protocols:  # a primary connection is of one protocol, by its port
            shared = next((port for port in defined.ports for theirs in other.ports
                           if other.ip_protocol == defined.ip_protocol
                           and port.low <= theirs.high and theirs.low <= port.high), None)
            if shared is not None:
                raise r.fail("ports", f"{shared.low}-{shared.high} overlaps protocol "
                                      f"'{other.name}''s primary ports")
        protocols.append(defined)
    known = {p.name for p in protocols}

    protocol_rules = []
    for r in root.tables("protocol_rule"):
        r.check_keys({"name", "action", "protocols", "clients", "users"})
        names = r.strings("protocols")
        for i, n in enumerate(names):
            if n not in known:
                raise PolicyInvalid((*r.path, "protocols", i), f"no protocol named '{n}' is defined")
        users = r.strings("users", None) if "users" in r.data else None
        protocol_rules.append(ProtocolRule(
            name=r.get("name", str), allow=r.action(), protocols=frozenset(names),
            clients=NetworkSet(r.networks("clients")),
            users=None if users is None else frozenset(users)))

    site_rules = []
    for r in root.tables("site_rule"):
        r.check_keys({"name", "action", "destinations"})
        site_rules.append(SiteRule(r.get("name", str), r.action(),
                                   NetworkSet(r.networks("destinations"))))

    d = root.table("defaults")
    d.check_keys({"permission_timeout", "max_pending_per_session"})
    timeout = d.get("permission_timeout", (int, float), Defaults.permission_timeout)
    if not 0 < timeout <= MAXIMUM_SECONDS:
        raise d.fail("permission_timeout",
                     f"must be a positive number of seconds, at most {MAXIMUM_SECONDS:.0f} (a year)")
    cap = d.get("max_pending_per_session", int, Defaults.max_pending_per_session)
    if not 1 <= cap <= MAXIMUM_COUNT:
        raise d.fail("max_pending_per_session", f"must be from 1 to {MAXIMUM_COUNT}")
    return Policy(tuple(protocols), tuple(protocol_rules), tuple(site_rules),
                  Defaults(float(timeout), cap))
