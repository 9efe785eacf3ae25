"""The firewall's own ports that no secondary connection may take (SPEC rule 14).

A filter may not open a secondary connection to a privileged port (below
``FIRST_UNPRIVILEGED_PORT``) or to a port the fw itself listens on. In NAT a
SecureNAT client's bind is a port of the fw, so the session API refuses such
ports there whatever the filter checked.

``Listening`` is what the fw's sockets listen on, as a value: the shell reads
it (``enforcer.listening``) and hands it in; the core only asks it questions.
A socket bound to a wildcard address listens on every address of its family.
An IPv6 wildcard socket takes IPv4 connections too unless it set IPV6_V6ONLY,
which the kernel's socket tables do not show, so it is taken to cover IPv4 as
well: the answer errs towards "listened".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from enforcer.core.packet import PROTOCOL_NAMES, IPAddress

FIRST_UNPRIVILEGED_PORT = 1024  # ports below it are privileged (OpenBSD's ftp-proxy refuses them)
_ANY4 = ipaddress.IPv4Address(0)
_ANY6 = ipaddress.IPv6Address(0)


def privileged(port: int) -> bool:
    return port < FIRST_UNPRIVILEGED_PORT


@dataclass(frozen=True)
class Listening:
    """The fw's listening sockets: (IP protocol, local address, port) each; the
    address may be a wildcard (0.0.0.0, ::)."""

    sockets: frozenset[tuple[int, IPAddress, int]] = frozenset()

    def covers(self, protocol: int, address: IPAddress, port: int) -> bool:
        """Whether a connection (or datagram) to ``address``:``port`` would reach one of
        the fw's sockets."""
        wildcards = (_ANY4, _ANY6) if address.version == 4 else (_ANY6,)
        return any((protocol, a, port) in self.sockets for a in (address, *wildcards))

    def to_list(self) -> list[str]:
        """For the status view: "tcp 198.51.100.1:8080", "udp [::]:53", ... sorted."""
        def text(protocol: int, address: IPAddress, port: int) -> str:
            where = f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"
            return f"{PROTOCOL_NAMES.get(protocol, str(protocol))} {where}"

        return [text(*s) for s in sorted(self.sockets, key=lambda s: (s[0], s[1].version,
                                                                      int(s[1]), s[2]))]


NOTHING_LISTENS = Listening()
