"""Ingress (SPEC rule 17): a packet is judged by the interface it arrived on.

Each internal interface has networks behind it: the daemon gives those of the
fw's own addresses there, and any list will do (networks routed through the
interface, say). A packet that arrives on an internal interface must come from a
network behind *that* interface, so a host on one internal network cannot pass
for a client of another; a packet that arrives on any other interface must not
come from an internal network at all, so the outside cannot pass for a client.
Sessions, permissions and binds are keyed by the client's address: this is what
makes the address mean the client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from enforcer.core.packet import Ingress, PacketMeta
from enforcer.core.policy import IPNetwork, NetworkSet


class InterfaceNetworks:
    """The networks behind each internal interface, and the rule that checks a packet's
    source against the interface it arrived on."""

    def __init__(self, behind: Mapping[str, Iterable[IPNetwork]]) -> None:
        """``behind``: internal interface name -> the networks behind it (an interface
        with none admits no source)."""
        self.behind = {name: NetworkSet(networks) for name, networks in behind.items()}
        self.internal = NetworkSet(dict.fromkeys(
            network for networks in self.behind.values() for network in networks.networks))

    def refusal(self, meta: PacketMeta) -> str | None:
        """Why ``meta``'s source cannot have arrived where it did, or None if it can."""
        if not meta.interface:
            return None  # the fw's own packet (an ICMP error it sends) arrived on no interface
        src = meta.key.src
        if meta.ingress is Ingress.INTERNAL:
            behind = self.behind.get(meta.interface)
            if behind is None or src not in behind:
                return f"source {src} is not on a network behind {meta.interface}"
        elif src in self.internal:
            return (f"source {src} is on an internal network but arrived on {meta.interface}, "
                    "which is not an internal interface")
        return None
