"""The clause catalog of SPEC.md: every result the conformance runner reports is keyed by these IDs.

Kept in the package so that an installed ``pinhole`` knows it; a unit test checks
it against SPEC.md when the spec is beside the checkout.
"""

from __future__ import annotations

CLAUSES: dict[str, str] = {
    'GEN-01': 'default deny: a secondary flow with no permission is dropped silently; nothing reaches the server.',
    'GEN-02': 'primary connections allowed by protocol rules pass; others do not.',
    'GEN-03': "fail-closed (rule 15): whenever the enforcer is not running (killed, crashed, stopped cleanly, restarting), no new flow passes in either direction and the fw's services are closed to the outside; a restart leaves one copy of its state; fail-open only when configured, and then tested.",
    'AFC-01': 'one admitted TCP connection, data both ways.',
    'AFC-02': 'single use: the second connection is dropped; other ports/addresses are dropped.',
    'AFC-03': 'ALLOW_MULTIPLE: sequential and concurrent connections admitted until Cancel.',
    'AFC-04': 'TIMEOUT: unused permission expires; admitted flow outlives the expiry.',
    'AFC-05': 'TIMEOUT|ALLOW_MULTIPLE, BIDIRECTIONAL with TCP, unknown flags, bad address or port: E_INVALIDARG, nothing created.',
    'AFC-06': 'source binding: another client host, or a spoofed source on the wrong interface, cannot use the permission.',
    'AFC-07': 'ADDRESS_BASED: another session on the same client IP may use the permission only with this flag.',
    'AFC-08': 'UDP one-way by default; BIDIRECTIONAL lets replies through.',
    'AFC-09': 'protocol rules deny: FWX_E_POLICY_RULES_DENIED, nothing created.',
    'AFC-10': 'site and content rules deny: FWX_E_NETWORK_RULES_DENIED, nothing created.',
    'AFC-11': 'Cancel semantics (rule 4), including FWX_E_TERMINATING.',
    'AFC-12': 'independent grants (rule 5).',
    'AFC-13': 'EstablishedConnection event: exactly one per admitted flow, right context, right filter only.',
    'AFC-14': 'ProxyExternalAddress on a multihomed fw with NAT between client and server.',
    'AFC-15': 'NO_KERNEL_MODE: every packet of the flow passes the user-mode path; without it, the flow is offloaded after admission.',
    'AFC-16': 'session end cancels pending permissions.',
    'RDC-01': 'InternalAddress on the client-facing interface; a connection to it reaches ConnectAddresses[0]; data both ways.',
    'RDC-02': 'N addresses: consecutive ports, action i ↔ address i, each cancellable alone.',
    'RDC-03': "ProxyExternalAddress: the redirected flow leaves from the requested external address (default: the primary's).",
    'RDC-04': 'single use, ALLOW_MULTIPLE, TIMEOUT and their invalid combination, as for AFC.',
    'RDC-05': 'UDP redirect: datagrams reach the target; replies return to the client from InternalAddress.',
    'RDC-06': "INCREASE_RECEIVE_BUFFER honoured (observable in the action's state and a burst test).",
    'RDC-07': 'connect-event notification to filters registered on the port, marked secondary.',
    'RDC-08': 'kernel NAT and user-space rewriting give identical results; checksums valid; related ICMP errors translated.',
    'RDC-09': 'EstablishedConnection event, as AFC-13.',
    'RDC-10': 'policy denials and invalid arguments, nothing created.',
    'BFC-01': "a Firewall client's bind through the fw succeeds and reports the fw's external address and port.",
    'RAB-01': 'before approval, inbound attempts to the bind are discarded silently and the bind stays pending.',
    'RAB-02': 'after RAB, an inbound connection from an allowed peer reaches the client through the bind.',
    'RAB-03': 'IpFilter: only peers in the included ranges get through; NULL unrestricted; empty filter blocks all.',
    'RAB-04': 'result codes: S_OK, S_FALSE, E_INVALIDARG, NOT_FOUND, FWX_E_TERMINATING, FWX_E_POLICY_RULES_DENIED.',
    'RAB-05': 'any-address with a nonzero port matches the bind on that port.',
    'RAB-06': 'UDP binds: receive only by default; BIDIRECTIONAL lets the client answer recent senders.',
    'RAB-07': 'INCREASE_RECEIVE_BUFFER on UDP binds.',
    'IPF-01': 'IpFilter object operations (rule 10), IPv4 and IPv6.',
    'APP-FTP-01': 'passive FTP (PASV, EPSV) through a default-deny fw, with real clients and servers.',
    'APP-FTP-02': 'active FTP (PORT, EPRT) for SecureNAT clients.',
    'APP-FTP-03': 'NAT mode: the client sees only the fw; the filter rewrites replies with RDC and keeps TCP sequence numbers right when lengths change.',
    'APP-FTP-04': 'Firewall client active FTP through a SOCKS5 BIND, approved with RAB and an IpFilter holding the server.',
    'APP-FTP-05': 'anti-bounce: third-party addresses in PORT/EPRT/PASV/EPSV open nothing.',
    'APP-FTP-06': 'commands and replies split across TCP segments are still handled; malformed ones open nothing and crash nothing.',
    'APP-FTP-07': 'data ports: PORT/EPRT/PASV/EPSV naming a privileged port or a port the fw listens on open nothing; in NAT no bind takes such a port of the fw.',
    'APP-TFTP-01': 'TFTP read and write through a default-deny fw with real clients and servers.',
    'ROB-01': "hostile volume: while one client floods PORT/EPRT commands, TFTP requests, grant calls or new flows, another client's admitted connection still opens, and its first SYN is not delayed by more than 50 ms.",
    'ROB-02': 'bounded state (rule 16): sessions from spoofed or many sources, binds, permissions and flows stay within the configured caps; at a cap new requests are refused and existing flows keep working; idle SecureNAT sessions end.',
    'ROB-03': 'a filtered flow keeps its state (rule 18): it survives a flood of other flows; a user-mode packet the enforcer does not know is dropped.',
    'ROB-04': 'malformed and random input at every interface (packets, SOCKS messages, control requests): dropped or answered with an error, and the enforcer goes on deciding; nothing is admitted that policy and permissions do not allow.',
    'ROB-05': "ingress (rule 17): with two internal networks, a host on one cannot use the addresses, sessions or permissions of the other's clients.",
    'ROB-06': 'a filtered TCP stream survives loss after the fw: re-segmented and coalesced retransmissions still deliver every byte, edited as the filter made it.',
    'FWC-01': 'the SOCKS service answers only on the internal side: from outside, its port gets nothing (silently dropped), TCP and UDP relay ports included.',
    'FWC-02': "a UDP ASSOCIATE relays only for the client endpoint that asked for it (RFC 1928's DST.ADDR and DST.PORT, or the first datagram's source where those are zero); datagrams from any other source, on the same IP too, are dropped, and replies go only to that endpoint.",
    'FWC-03': "one-way UDP for Firewall clients: without BIDIRECTIONAL, a target's replies are not relayed to the client.",
    'FWC-04': 'limits before and after authentication: a slow or idle handshake is closed after a timeout, connections per client and in total are capped, a BIND waits for its peer a bounded time, and bytes a client sends before its relay starts are bounded; a failed authentication never gets a success reply.',
}

# The clauses checked in the split topology alone
SPLIT_ONLY = ("ROB-05",)
# Where a clause's checks do not run, and why: (clause, or "*" for every clause but
# SPLIT_ONLY; cells as "topology/family" with "*" for any; the reason). The strict runner
# accepts these gaps and no others; the matrix shows them as n/a.
NOT_APPLICABLE: tuple[tuple[str, str, str], ...] = (
    ("*", "split/*", "the split topology (two internal networks) is for ingress per interface, ROB-05"),
    ("ROB-05", "routed/*", "ingress per interface needs two internal networks (the split topology)"),
    ("ROB-05", "nat/*", "ingress per interface needs two internal networks (the split topology)"),
    ("APP-FTP-03", "routed/*", "a NAT clause: routed, the client talks to the server's own address"),
    ("ROB-06", "routed/*", "checked where the FTP filter edits the stream: NAT"),
)
# Clauses that check no firewall behaviour (the trivial firewalls of the self-check need
# not fail them), and why
NO_FIREWALL_BEHAVIOUR: dict[str, str] = {
    "IPF-01": "the IpFilter object's own operations (rule 10), not what a firewall does",
}


def not_applicable(clause: str, topology: str, family: str) -> str | None:
    """Why the catalog marks this cell of a clause n/a, or None."""
    for who, cell, why in NOT_APPLICABLE:
        where, fam = cell.split("/")
        if (who == clause or (who == "*" and clause not in SPLIT_ONLY)) and \
                where in ("*", topology) and fam in ("*", family):
            return why
    return None
