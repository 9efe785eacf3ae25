"""A third-party firewall under pinhole's clause suite: an example driver.

The firewall is a plain stateful nftables ruleset: it enforces the lab policy for
primary connections (FTP, TFTP and DNS for every client, HTTP for c1 alone, nothing to
the "denied" network, replies of tracked flows) and has no session API at all. So it
claims GEN-01 and GEN-02 only, and every session call is "not supported" (the base
class's), which makes a check that needs one n/a for it.

Run it as::

    pinhole conformance --firewall enforcer,examples/nft_stateful.py:NftStateful -k "GEN-01 or GEN-02"

A driver is a subclass of ``testbed.drivers.Firewall``: it puts its firewall in the
testbed's ``fw`` namespace (``start``), stops it as an operator would (``stop``), takes
it out leaving nothing behind (``remove``), says what it claims, and offers the session
API (``client``) if the firewall has one.
"""

from __future__ import annotations

from typing import ClassVar

from testbed.drivers import Firewall
from testbed.lab import PORTS
from testbed.topology import FAMILIES

TABLE = "example_stateful"


class NftStateful(Firewall):
    name = "nft-stateful"
    title = "nftables, stateful (example)"
    claims: ClassVar[tuple[str, ...]] = ("GEN-01", "GEN-02")
    modes: ClassVar[tuple[str, ...]] = ("kernel",)
    # nftables decides a packet as it arrives: a silent drop's check need not wait longer
    holds_packets: ClassVar[float | None] = 0.0

    _installed = False

    @property
    def running(self) -> bool:
        return self._installed

    def ruleset(self) -> str:
        """The table: the lab policy for primaries, forwarded; source NAT in the nat variant."""
        topo = self.tb.topology
        inside = ", ".join(f'"{i}"' for i in topo.fw_internal_ifaces)
        outside = topo.fw_external_iface
        lines = [f"table inet {TABLE} {{", "  chain forward {",
                 "    type filter hook forward priority 0; policy drop;",
                 "    ct state established,related accept"]
        everyone = {"FTP", "TFTP", "DNS"}
        for family in FAMILIES:
            ip = "ip" if family == "ipv4" else "ip6"
            denied, external = topo.denied_network(family), topo.external_network(family)
            for name, (proto, port) in PORTS.items():
                if name in everyone:
                    sources = list(topo.internal_networks(family))
                elif name == "HTTP":
                    sources = [topo.address("c1", family)]
                else:
                    continue
                for source in sources:
                    lines.append(f"    iifname {{ {inside} }} oifname \"{outside}\" {ip} saddr {source} "
                                 f"{ip} daddr {external} {ip} daddr != {denied} {proto} dport {port} "
                                 "ct state new accept")
        lines.append("  }")
        if topo.variant == "nat":
            lines += ["  chain postrouting {", "    type nat hook postrouting priority 100;"]
            for family in FAMILIES:
                ip = "ip" if family == "ipv4" else "ip6"
                external_address = topo.fw_external_addresses(family)[0]
                lines += [f"    oifname \"{outside}\" {ip} saddr {net} snat {ip} to {external_address}"
                          for net in topo.internal_networks(family)]
            lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def start(self, *, fail_open: bool = False, backend: str = "auto",
              dataplane: dict[str, object] | None = None, app_filters: tuple[str, ...] = (),
              limits: dict[str, object] | None = None) -> None:
        if not self._installed:
            self.tb.run("fw", ["nft", "-f", "-"], input=self.ruleset())
            self._installed = True

    def stop(self) -> int:
        return 0  # rules only: a stopped ruleset is still in place

    def remove(self) -> None:
        if self._installed:
            self.tb.run("fw", ["nft", "delete", "table", "inet", TABLE])
            self._installed = False
