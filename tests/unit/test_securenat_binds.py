"""SecureNAT binds in the pure core: an application filter makes a SecureNAT client's port
reachable for one inbound flow (Engine.bind_for_securenat), RetroactiveAllowBind approves
it, and Engine.decide admits one flow to it; expiry, withdrawal and the session's end close
it. Also: primaries of a protocol an application filter watches run in user mode."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import pytest
from core_policy import INTERNAL, POLICY_DATA, pkt, retired_binds

from enforcer.core import packet
from enforcer.core.binds import Bind, BindState
from enforcer.core.decisions import SAME_FLOW_WINDOW
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.flows import Mode
from enforcer.core.fwports import Listening
from enforcer.core.ipfilter import IpFilter
from enforcer.core.packet import ICMP, TCP, UDP, FlowKey, Ingress, IPAddress, PacketMeta
from enforcer.core.policy import policy_from_dict
from enforcer.core.results import InvalidArgument, IsBusy, Terminating
from enforcer.core.state import Verdict

ip = ipaddress.ip_address

TIMEOUT = 25.0  # not the default 60: a bind's lifetime comes from the policy
POLICY = policy_from_dict({**POLICY_DATA, "defaults": {"permission_timeout": TIMEOUT}})
C1, C2, C6 = ip("192.0.2.11"), ip("192.0.2.12"), ip("2001:db8:1::11")
S1, S2, S6 = ip("198.51.100.21"), ip("198.51.100.22"), ip("2001:db8:2::21")
EXT4, EXT6, EXT4B = ip("198.51.100.1"), ip("2001:db8:2::1"), ip("198.51.100.2")
EXTERNAL = (EXT4, EXT6, EXT4B)
BIND_PORTS = (20000, 20002)
KERNEL_REDIRECT_PORTS = (61000, 61009)
USER_REDIRECT_PORTS = (63000, 63009)
FTP = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2101")
DNS = uuid.UUID("5c3c2a3e-8f1b-4c1e-9a57-1f0d3a6b2104")
SYN = packet.TCP_SYN
ACK = 0x10
PORT = 50000  # the client's port an application filter asks for
NO_FLAGS = Flags(0)


def make_engine(nat: bool, external: tuple[IPAddress, ...] = EXTERNAL, **kwargs: Any) -> Engine:
    return Engine(POLICY, INTERNAL, external, nat=nat, bind_ports=BIND_PORTS,
                  kernel_redirect_ports=KERNEL_REDIRECT_PORTS, user_redirect_ports=USER_REDIRECT_PORTS,
                  **kwargs)


@pytest.fixture
def routed() -> Engine:
    return make_engine(nat=False)


@pytest.fixture
def natted() -> Engine:
    return make_engine(nat=True)


@pytest.fixture(params=[False, True], ids=["routed", "nat"])
def engine(request: pytest.FixtureRequest) -> Engine:
    return make_engine(nat=request.param)


def securenat(engine: Engine, client: IPAddress = C1, now: float = 1.0) -> int:
    """The client's SecureNAT session, made by an FTP primary connection."""
    server = S6 if client.version == 6 else S1
    decision = engine.decide(pkt(str(client), str(server), 21), now)
    assert decision.verdict is Verdict.ADMIT_KERNEL and decision.session_id is not None
    return decision.session_id


def from_server(server: IPAddress, client: IPAddress = C1, port: int = PORT, *, proto: int = TCP,
                sport: int = 20, flags: int = SYN) -> PacketMeta:
    """A new flow's first packet from outside to the client's port (after the kernel's NAT)."""
    return PacketMeta(FlowKey(proto, server, sport, client, port), Ingress.EXTERNAL,
                      flags if proto == TCP else 0)


def only(*servers: IPAddress) -> IpFilter:
    f = IpFilter()
    for server in servers:
        f.include_range(str(server), str(server))
    return f


def approve(engine: Engine, bind: Bind, ipfilter: IpFilter | None, now: float = 2.0,
            flags: Flags = NO_FLAGS) -> None:
    guid = FTP if bind.protocol == TCP else DNS
    got, first = engine.retroactive_allow_bind(bind.session_id, bind.protocol, bind.address, bind.port,
                                               guid, flags, ipfilter, now)
    assert got is bind and first


# --- where a bind is --------------------------------------------------------------------------

def test_a_routed_bind_is_the_client_s_own_address_and_port(routed: Engine) -> None:
    session = securenat(routed)
    bind, new = routed.bind_for_securenat(session, TCP, PORT, 3.0)
    assert new is True
    assert (bind.address, bind.port, bind.client, bind.client_port) == (C1, PORT, C1, PORT)
    assert (bind.session_id, bind.protocol, bind.state) == (session, TCP, BindState.PENDING)
    assert bind.pooled is False and bind.for_securenat
    assert bind.created == 3.0 and bind.expires == 3.0 + TIMEOUT
    assert routed.bind_ports.in_use == 0
    assert routed.binds.leading_to(TCP, C1, PORT) is bind
    assert routed.binds.at(TCP, C1, PORT) is bind
    out = bind.to_dict()
    assert out["address"] == ["192.0.2.11", PORT] and out["leads_to"] == ["192.0.2.11", PORT]
    assert out["expires"] == 3.0 + TIMEOUT and out["protocol"] == "tcp"
    # a port in the bind pool is still the client's own, and so is an IPv6 client's
    in_pool, _ = routed.bind_for_securenat(session, UDP, BIND_PORTS[0], 3.0)
    assert (in_pool.address, in_pool.port, in_pool.pooled) == (C1, BIND_PORTS[0], False)
    six, _ = routed.bind_for_securenat(securenat(routed, C6), TCP, PORT, 3.0)
    assert (six.address, six.port, six.client) == (C6, PORT, C6)
    assert routed.bind_ports.in_use == 0


def test_a_nat_bind_is_the_first_external_address_with_the_client_s_port(natted: Engine) -> None:
    bind, new = natted.bind_for_securenat(securenat(natted), TCP, PORT, 3.0)
    assert new is True
    assert (bind.address, bind.port, bind.pooled) == (EXT4, PORT, False)
    assert (bind.client, bind.client_port) == (C1, PORT)
    assert bind.to_dict()["leads_to"] == ["192.0.2.11", PORT]
    assert natted.binds.at(TCP, EXT4, PORT) is bind and natted.binds.leading_to(TCP, C1, PORT) is bind
    assert natted.bind_ports.in_use == 0
    six, _ = natted.bind_for_securenat(securenat(natted, C6), TCP, PORT, 3.0)
    assert (six.address, six.port, six.client) == (EXT6, PORT, C6)


def test_a_nat_bind_takes_a_pool_port_when_the_client_s_port_is_bound_already(natted: Engine) -> None:
    first, _ = natted.bind_for_securenat(securenat(natted, C1), TCP, PORT, 3.0)
    second, new = natted.bind_for_securenat(securenat(natted, C2), TCP, PORT, 3.0)
    assert new is True and second is not first
    assert second.address == EXT4 and second.pooled is True
    assert BIND_PORTS[0] <= second.port <= BIND_PORTS[1]
    assert (second.client, second.client_port) == (C2, PORT)
    assert natted.bind_ports.in_use == 1
    assert natted.binds.at(TCP, EXT4, second.port) is second
    assert natted.binds.leading_to(TCP, C2, PORT) is second
    assert natted.binds.leading_to(TCP, C1, PORT) is first
    # another protocol's port of the same number is free
    udp, _ = natted.bind_for_securenat(securenat(natted, C2), UDP, PORT, 3.0)
    assert (udp.address, udp.port, udp.pooled) == (EXT4, PORT, False)


@pytest.mark.parametrize("client_port", [
    pytest.param(BIND_PORTS[0], id="bind-pool-low"),
    pytest.param(BIND_PORTS[1], id="bind-pool-high"),
    pytest.param(BIND_PORTS[0] - 1, id="below-bind-pool"),
    pytest.param(KERNEL_REDIRECT_PORTS[0], id="kernel-redirect-low"),
    pytest.param(KERNEL_REDIRECT_PORTS[1], id="kernel-redirect-high"),
    pytest.param(USER_REDIRECT_PORTS[0], id="user-redirect-low"),
    pytest.param(USER_REDIRECT_PORTS[1], id="user-redirect-high"),
    pytest.param(1024, id="port-1024"),
    pytest.param(65535, id="port-65535"),
])
def test_a_nat_bind_keeps_the_client_s_port_in_the_fw_s_port_ranges_too(natted: Engine,
                                                                        client_port: int) -> None:
    """A TFTP server answers the port the request came from, which the fw's source NAT
    keeps: the bind must be on it, whatever range of the fw's it is in (Windows and macOS
    clients take ports up to 65535; the redirect pools are ports of the fw's internal
    addresses, and the bind pool gives out none a bind holds)."""
    bind, _ = natted.bind_for_securenat(securenat(natted), UDP, client_port, 3.0)
    assert (bind.address, bind.port, bind.pooled, bind.client_port) == (EXT4, client_port, False, client_port)
    assert natted.bind_ports.in_use == 0


def test_the_bind_pool_gives_out_no_port_a_bind_keeps(natted: Engine) -> None:
    """With C1's bind on the bind pool's first port, neither a Firewall client's bind nor
    a SecureNAT bind that goes to the pool gets that port."""
    kept, _ = natted.bind_for_securenat(securenat(natted), TCP, BIND_PORTS[0], 2.0)
    assert (kept.port, kept.pooled) == (BIND_PORTS[0], False)
    socks = natted.bind_for_client(natted.open_firewall_session(C2, "alice", 1.0).id, TCP, EXT4, 2.0)
    assert socks.port == BIND_PORTS[0] + 1
    pooled, _ = natted.bind_for_securenat(securenat(natted, C2), TCP, BIND_PORTS[0], 2.0)
    assert (pooled.port, pooled.pooled) == (BIND_PORTS[0] + 2, True)
    with pytest.raises(IsBusy, match="no 1 consecutive free ports among the bind ports"):
        natted.bind_for_client(natted.open_firewall_session(C2, "bob", 1.0).id, TCP, EXT4, 2.0)


def test_asking_again_for_the_same_client_port_gives_the_same_bind(engine: Engine) -> None:
    session = securenat(engine)
    bind, new = engine.bind_for_securenat(session, TCP, PORT, 3.0)
    again, new_again = engine.bind_for_securenat(session, TCP, PORT, 9.0)
    assert new is True and new_again is False and again is bind
    assert bind.created == 3.0 and bind.expires == 3.0 + TIMEOUT  # not renewed
    udp, new_udp = engine.bind_for_securenat(session, UDP, PORT, 9.0)
    other, new_other = engine.bind_for_securenat(session, TCP, PORT + 1, 9.0)
    assert new_udp and new_other and len({bind.id, udp.id, other.id}) == 3
    assert len(engine.binds) == 3
    # once closed, the same port gets a new bind
    engine.withdraw_bind(bind)
    fresh, new_fresh = engine.bind_for_securenat(session, TCP, PORT, 10.0)
    assert new_fresh is True and fresh is not bind and fresh.expires == 10.0 + TIMEOUT


FW_INT4, FW_INT6 = ipaddress.ip_interface("192.0.2.1/24"), ipaddress.ip_interface("2001:db8:1::1/64")


@pytest.mark.parametrize("nat", [False, True], ids=["routed", "nat"])
def test_a_bind_from_the_fw_comes_from_the_fw_s_address_on_the_client_s_network(nat: bool) -> None:
    """APP-FTP-03: for a client that sees only the fw, a bind's flow is to reach it from
    the fw's address on its network, and its peer, which sees only the fw too, reaches
    it on an external address of the fw; the kernel translates that (``translated``),
    routed too, and the bind's NAT is retired when it closes. Without from_fw: the
    peer's own."""
    engine = make_engine(nat=nat, internal_addresses=(FW_INT4, FW_INT6))
    for client, fw in ((C1, FW_INT4.ip), (C6, FW_INT6.ip)):
        session = securenat(engine, client)
        bind, new = engine.bind_for_securenat(session, TCP, PORT, 2.0, from_fw=True)
        assert new and bind.source == fw and bind.translated
        assert (bind.address, bind.port) == (engine.external_address(client.version), PORT)
        assert bind.to_dict()["source"] == str(fw)
        plain, _ = engine.bind_for_securenat(session, TCP, PORT + 1, 2.0)
        assert plain.source is None and plain.to_dict()["source"] is None
        assert plain.translated is nat  # routed, a plain bind is the client's own port
        approve(engine, bind, only(S6 if client.version == 6 else S1))
        decision = engine.decide(from_server(S6 if client.version == 6 else S1, client), 3.0)
        assert decision.verdict is Verdict.ADMIT_KERNEL and bind.state is BindState.CLOSED
        assert retired_binds(engine) == [bind]


def test_a_bind_from_the_fw_needs_an_address_of_the_fw_on_the_client_s_network(natted: Engine) -> None:
    """The engine knows no internal address of the fw: nothing to come from, nothing bound."""
    with pytest.raises(InvalidArgument, match=f"the firewall has no address on {C1}'s network"):
        natted.bind_for_securenat(securenat(natted), TCP, PORT, 2.0, from_fw=True)
    assert len(natted.binds) == 0


def test_the_same_client_port_asked_with_the_other_source_is_busy() -> None:
    """A client's port bound to be reached from the fw is not the one bound for the peer's
    own address (nor the other way round): IsBusy, the bind left as it is."""
    engine = make_engine(nat=True, internal_addresses=(FW_INT4,))
    session = securenat(engine)
    bind, _ = engine.bind_for_securenat(session, TCP, PORT, 2.0, from_fw=True)
    assert engine.bind_for_securenat(session, TCP, PORT, 3.0, from_fw=True) == (bind, False)
    with pytest.raises(IsBusy, match="bound already, to be reached from the fw"):
        engine.bind_for_securenat(session, TCP, PORT, 3.0)
    plain, _ = engine.bind_for_securenat(session, UDP, PORT, 2.0)
    with pytest.raises(IsBusy, match="bound already, not to be reached from the fw"):
        engine.bind_for_securenat(session, UDP, PORT, 3.0, from_fw=True)
    assert (bind.source, plain.source) == (FW_INT4.ip, None) and len(engine.binds) == 2


# --- what is refused ----------------------------------------------------------------------------

def test_a_firewall_client_session_is_refused(engine: Engine) -> None:
    session = engine.open_firewall_session(C1, "alice", 1.0).id
    with pytest.raises(InvalidArgument, match=f"session {session} is a Firewall client's"):
        engine.bind_for_securenat(session, TCP, PORT, 2.0)
    assert len(engine.binds) == 0 and engine.binds.leading_to(TCP, C1, PORT) is None


@pytest.mark.parametrize(("protocol", "client_port", "message"), [
    pytest.param(ICMP, PORT, "protocol must be TCP", id="icmp"),
    pytest.param(0, PORT, "protocol must be TCP", id="protocol-0"),
    pytest.param(TCP, 0, "client port must be 1-65535", id="port-0"),
    pytest.param(UDP, 65536, "client port must be 1-65535", id="port-65536"),
    pytest.param(TCP, -1, "client port must be 1-65535", id="port-negative"),
])
def test_protocol_and_port_are_checked(engine: Engine, protocol: int, client_port: int, message: str) -> None:
    session = securenat(engine)
    with pytest.raises(InvalidArgument, match=message):
        engine.bind_for_securenat(session, protocol, client_port, 2.0)
    assert len(engine.binds) == 0 and engine.bind_ports.in_use == 0


def test_an_unknown_session_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidArgument, match="no session 77"):
        engine.bind_for_securenat(77, TCP, PORT, 2.0)


def test_nat_without_an_external_address_of_the_client_s_family() -> None:
    engine = make_engine(nat=True, external=(EXT4,))
    with pytest.raises(InvalidArgument, match="no external IPv6 address"):
        engine.bind_for_securenat(securenat(engine, C6), TCP, PORT, 2.0)
    assert len(engine.binds) == 0
    # routed, an IPv6 client needs none
    routed = make_engine(nat=False, external=(EXT4,))
    assert routed.bind_for_securenat(securenat(routed, C6), TCP, PORT, 2.0)[0].address == C6


# --- rule 14: no bind takes a privileged port of the fw, or one it listens on ------------------

def listening(*sockets: tuple[int, str, int]) -> Listening:
    return Listening(frozenset((proto, ip(address), port) for proto, address, port in sockets))


@pytest.mark.parametrize("client_port", [1, 21, 22, 1023])
@pytest.mark.parametrize("client", [C1, C6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_a_nat_bind_never_takes_a_privileged_port_of_the_fw(natted: Engine, proto: int,
                                                            client: IPAddress, client_port: int) -> None:
    session = securenat(natted, client)
    external = EXT4 if client.version == 4 else EXT6
    with pytest.raises(InvalidArgument,
                       match=f"port {client_port} of the firewall's {external} is privileged"):
        natted.bind_for_securenat(session, proto, client_port, 2.0)
    assert len(natted.binds) == 0 and natted.binds.of(session) == []
    assert natted.bind_ports.in_use == 0 and retired_binds(natted) == []
    # the first unprivileged port is the client's own
    bind, _ = natted.bind_for_securenat(session, proto, 1024, 2.0)
    assert (bind.address, bind.port, bind.pooled) == (external, 1024, False)


def test_routed_a_privileged_port_is_the_client_s_own_to_bind(routed: Engine) -> None:
    """Routed, the bind is the client's own address: nothing of the fw's is taken (which
    ports of a client a filter may open is the filter's to say: rule 14)."""
    bind, _ = routed.bind_for_securenat(securenat(routed), TCP, 22, 2.0,
                                        listening((TCP, "0.0.0.0", 22)))
    assert (bind.address, bind.port, bind.pooled) == (C1, 22, False)


@pytest.mark.parametrize(("socket", "client", "refused"), [
    pytest.param((TCP, "198.51.100.1", PORT), C1, True, id="the-external-address"),
    pytest.param((TCP, "0.0.0.0", PORT), C1, True, id="ipv4-wildcard"),
    pytest.param((TCP, "::", PORT), C1, True, id="ipv6-wildcard-dual-stack"),
    pytest.param((TCP, "::", PORT), C6, True, id="ipv6-wildcard"),
    pytest.param((TCP, "2001:db8:2::1", PORT), C6, True, id="the-external-ipv6-address"),
    pytest.param((TCP, "0.0.0.0", PORT), C6, False, id="ipv4-wildcard-for-ipv6"),
    pytest.param((TCP, "192.0.2.1", PORT), C1, False, id="an-internal-address"),
    pytest.param((TCP, "198.51.100.2", PORT), C1, False, id="another-external-address"),
    pytest.param((TCP, "127.0.0.1", PORT), C1, False, id="loopback"),
    pytest.param((UDP, "0.0.0.0", PORT), C1, False, id="another-protocol"),
    pytest.param((TCP, "0.0.0.0", PORT + 1), C1, False, id="another-port"),
])
def test_a_nat_bind_never_takes_a_port_the_fw_listens_on(natted: Engine, socket: tuple[int, str, int],
                                                         client: IPAddress, refused: bool) -> None:
    """Refused rather than moved to a pool port: the clause asks that a data port the fw
    listens on open nothing, and a pool port would not serve a client whose peer answers
    the source port it saw (TFTP)."""
    session = securenat(natted, client)
    fw = listening(socket)
    if refused:
        with pytest.raises(InvalidArgument, match=f"the firewall listens on tcp .* port {PORT}"):
            natted.bind_for_securenat(session, TCP, PORT, 2.0, fw)
        assert len(natted.binds) == 0 and natted.bind_ports.in_use == 0
    else:
        bind, _ = natted.bind_for_securenat(session, TCP, PORT, 2.0, fw)
        assert (bind.port, bind.pooled) == (PORT, False)


def test_the_fw_s_own_socks_binds_do_not_make_it_refuse_itself(natted: Engine) -> None:
    """The SOCKS service listens on the bind ports it hands out: a client port that meets
    one goes to the pool, as any port of the pool's does, and gets another."""
    socks = natted.bind_for_client(natted.open_firewall_session(C2, "alice", 1.0).id, TCP, EXT4, 1.0)
    fw = listening((TCP, str(EXT4), socks.port))
    bind, new = natted.bind_for_securenat(securenat(natted), TCP, socks.port, 2.0, fw)
    assert new and bind.pooled and bind.port != socks.port and bind.port in natted.bind_ports
    assert natted.bind_ports.in_use == 2


def test_a_pool_port_is_never_one_the_fw_listens_on(natted: Engine) -> None:
    """A client port another bind holds goes to the pool, which gives out no port the fw
    listens on (a UDP socket leaves the TCP port free); with every pool port listened on,
    nothing is bound."""
    first, middle, last = BIND_PORTS[0], BIND_PORTS[0] + 1, BIND_PORTS[1]
    natted.bind_for_securenat(securenat(natted, C2), TCP, PORT, 2.0)  # C2 holds PORT
    session = securenat(natted)
    fw = listening((TCP, "0.0.0.0", first), (TCP, "::", middle), (UDP, "0.0.0.0", last))
    bind, _ = natted.bind_for_securenat(session, TCP, PORT, 2.0, fw)
    assert (bind.port, bind.pooled) == (last, True)
    natted.withdraw_bind(bind)
    everything = listening(*((TCP, str(EXT4), p) for p in range(first, last + 1)))
    with pytest.raises(IsBusy, match="no 1 consecutive free ports among the bind ports"):
        natted.bind_for_securenat(session, TCP, PORT, 2.0, everything)
    assert natted.bind_ports.in_use == 0
    assert natted.binds.leading_to(TCP, C1, PORT) is None


# --- inbound flows ------------------------------------------------------------------------------

def test_before_approval_an_inbound_flow_is_dropped_and_counted(engine: Engine) -> None:
    bind, _ = engine.bind_for_securenat(securenat(engine), TCP, PORT, 2.0)
    flows = len(engine.flows)
    d = engine.decide(from_server(S1), 3.0)
    assert d.verdict is Verdict.DROP and f"bind {bind.id} is pending" in d.reason
    assert (bind.discarded, bind.admitted, bind.state) == (1, 0, BindState.PENDING)
    assert len(engine.flows) == flows
    # the bind is still there to be approved
    approve(engine, bind, None)
    assert engine.decide(from_server(S1), 4.0).verdict is Verdict.ADMIT_KERNEL


def test_flows_to_other_ports_or_clients_are_not_the_bind_s(engine: Engine) -> None:
    bind, _ = engine.bind_for_securenat(securenat(engine), TCP, PORT, 2.0)
    approve(engine, bind, None)
    securenat(engine, C2)
    for meta in (from_server(S1, port=PORT + 1), from_server(S1, C2), from_server(S1, proto=UDP)):
        d = engine.decide(meta, 3.0)
        assert d.verdict is Verdict.DROP and "arrived on the external side" in d.reason
    # a TCP packet that is no SYN opens nothing, and leaves the bind open
    d = engine.decide(from_server(S1, flags=ACK), 3.0)
    assert d.verdict is Verdict.DROP and "cannot open a connection" in d.reason
    assert (bind.admitted, bind.discarded, bind.state) == (0, 0, BindState.ALLOWED)
    assert engine.decide(from_server(S1), 4.0).verdict is Verdict.ADMIT_KERNEL


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_an_approved_bind_admits_its_server_s_first_flow_only(engine: Engine, proto: int) -> None:
    session = securenat(engine)
    bind, _ = engine.bind_for_securenat(session, proto, PORT, 2.0)
    approve(engine, bind, only(S1))
    # another server: dropped, counted, and the bind stays open for the right one
    d = engine.decide(from_server(S2, proto=proto), 3.0)
    assert d.verdict is Verdict.DROP and "IpFilter" in d.reason
    assert (bind.discarded, bind.state) == (1, BindState.ALLOWED)
    # the server: admitted in kernel mode, for the client's session
    d = engine.decide(from_server(S1, proto=proto), 4.0, length=60)
    assert d.verdict is Verdict.ADMIT_KERNEL
    assert d.session_id == session and d.protocol == ("FTP" if proto == TCP else "DNS")
    assert d.key == FlowKey(proto, S1, 20, C1, PORT)
    record = engine.flows.get(d.key)
    assert record is not None and record.session_id == session and record.mode is Mode.KERNEL
    assert record.bytes_out == 60
    # one flow: the bind is done
    assert (bind.admitted, bind.state) == (1, BindState.CLOSED)
    assert engine.binds.leading_to(proto, C1, PORT) is None
    assert engine.binds.at(proto, bind.address, bind.port) is None
    d = engine.decide(from_server(S1, proto=proto, sport=21), 5.0)
    assert d.verdict is Verdict.DROP and "arrived on the external side" in d.reason
    assert bind.admitted == 1


def test_the_admitted_udp_flow_s_next_datagrams_are_its_own(engine: Engine) -> None:
    bind, _ = engine.bind_for_securenat(securenat(engine), UDP, PORT, 2.0)
    approve(engine, bind, only(S1))
    assert engine.decide(from_server(S1, proto=UDP), 4.0).verdict is Verdict.ADMIT_KERNEL
    # a datagram queued before the kernel had recorded the verdict arrives as new
    d = engine.decide(from_server(S1, proto=UDP), 4.0 + SAME_FLOW_WINDOW / 2)
    assert d.verdict is Verdict.ADMIT_KERNEL and "later datagram" in d.reason
    assert (bind.admitted, bind.discarded) == (1, 0)
    late = engine.decide(from_server(S1, proto=UDP), 4.0 + SAME_FLOW_WINDOW + 0.5)
    assert late.verdict is Verdict.DROP


@pytest.mark.parametrize(("proto", "flags", "one_way"), [
    (UDP, Flags(0), True), (UDP, Flags.BIDIRECTIONAL, False),
    (UDP, Flags.INCREASE_RECEIVE_BUFFER, True), (TCP, Flags(0), False)],
    ids=["udp", "udp-bidirectional", "udp-increase-receive-buffer", "tcp"])
def test_a_udp_bind_receives_only_unless_bidirectional(engine: Engine, proto: int, flags: Flags,
                                                       one_way: bool) -> None:
    """RAB-06: the flow a peer opens to a UDP bind approved without BIDIRECTIONAL is one
    way (the shell marks it so; the kernel drops its reply direction: the client's
    answers to the peer); with BIDIRECTIONAL the client may answer. Its later datagrams
    that reach the enforcer get the same verdict."""
    bind, _ = engine.bind_for_securenat(securenat(engine), proto, PORT, 2.0)
    approve(engine, bind, only(S1), flags=flags)
    d = engine.decide(from_server(S1, proto=proto), 3.0)
    assert d.verdict is Verdict.ADMIT_KERNEL and d.one_way is one_way
    record = engine.flows.get(d.key)
    assert record is not None and record.one_way is one_way and record.inbound
    if proto == UDP:
        again = engine.decide(from_server(S1, proto=proto), 3.1)
        assert "later datagram" in again.reason and again.one_way is one_way


def test_each_decision_is_recorded_once(engine: Engine) -> None:
    bind, _ = engine.bind_for_securenat(securenat(engine), TCP, PORT, 2.0)
    before, drops, admits = len(engine.recent), engine.counters["drop"], engine.counters["admit-kernel"]
    pending = engine.decide(from_server(S1), 3.0)
    assert len(engine.recent) == before + 1 and engine.recent[-1] is pending
    approve(engine, bind, only(S1))
    refused = engine.decide(from_server(S2), 3.0)
    admitted = engine.decide(from_server(S1), 3.0)
    assert list(engine.recent)[before:] == [pending, refused, admitted]
    assert engine.counters["drop"] == drops + 2 and engine.counters["admit-kernel"] == admits + 1


def test_nat_binds_are_retired_when_closed_routed_ones_are_not() -> None:
    for nat in (False, True):
        engine = make_engine(nat=nat)
        bind, _ = engine.bind_for_securenat(securenat(engine), TCP, PORT, 2.0)
        approve(engine, bind, None)
        assert retired_binds(engine) == []
        engine.decide(from_server(S1), 3.0)
        assert bind.state is BindState.CLOSED
        assert retired_binds(engine) == ([bind] if nat else [])
        assert retired_binds(engine) == []
        engine.bind_done(bind)  # twice is once
        assert retired_binds(engine) == []


def test_a_pooled_port_goes_back_to_the_pool(natted: Engine) -> None:
    mine, _ = natted.bind_for_securenat(securenat(natted, C1), TCP, PORT, 2.0)
    pooled, _ = natted.bind_for_securenat(securenat(natted, C2), TCP, PORT, 2.0)
    assert natted.bind_ports.in_use == 1
    approve(natted, pooled, None)
    assert natted.decide(from_server(S1, C2), 3.0).verdict is Verdict.ADMIT_KERNEL
    assert natted.bind_ports.in_use == 0
    approve(natted, mine, None)
    assert natted.decide(from_server(S1, C1), 3.0).verdict is Verdict.ADMIT_KERNEL
    assert natted.bind_ports.in_use == 0  # the client's own port was never the pool's
    assert retired_binds(natted) == [pooled, mine]


# --- expiry, withdrawal, the session's end ----------------------------------------------------------

def test_an_unused_bind_expires_after_the_permission_timeout(natted: Engine) -> None:
    session = securenat(natted)
    pending, _ = natted.bind_for_securenat(session, TCP, PORT, 2.0)
    approved, _ = natted.bind_for_securenat(session, UDP, BIND_PORTS[0], 4.0)  # pooled
    approve(natted, approved, None)
    natted.expire(2.0 + TIMEOUT - 0.01)
    assert pending.state is BindState.PENDING and approved.state is BindState.ALLOWED
    assert retired_binds(natted) == []
    natted.expire(2.0 + TIMEOUT)
    assert pending.state is BindState.CLOSED and approved.state is BindState.ALLOWED
    assert retired_binds(natted) == [pending]
    natted.expire(4.0 + TIMEOUT)
    assert approved.state is BindState.CLOSED and natted.bind_ports.in_use == 0
    assert retired_binds(natted) == [approved]
    assert natted.decide(from_server(S1), 50.0).verdict is Verdict.DROP
    natted.expire(10**6)
    assert retired_binds(natted) == []


def test_a_bind_expired_before_the_timer_swept_it_is_neither_given_again_nor_approved(
        natted: Engine) -> None:
    """Between a bind's expiry and the timer's next turn, asking for the same client port
    makes a new bind (the expired one is closed), and approving the expired one is
    FWX_E_TERMINATING, never an S_OK for a bind that drops its peer."""
    session = securenat(natted)
    old, _ = natted.bind_for_securenat(session, TCP, PORT, 2.0)
    late = 2.0 + TIMEOUT + 0.5
    new, made = natted.bind_for_securenat(session, TCP, PORT, late)
    assert made and new is not old and old.state is BindState.CLOSED
    other, _ = natted.bind_for_securenat(session, UDP, PORT, late)
    with pytest.raises(Terminating):
        natted.retroactive_allow_bind(session, UDP, other.address, other.port, FTP, Flags(0), None,
                                      late + TIMEOUT + 0.5)
    assert other.state is BindState.CLOSED


def test_expiry_leaves_used_binds_and_firewall_client_binds_alone(natted: Engine) -> None:
    used, _ = natted.bind_for_securenat(securenat(natted), TCP, PORT, 2.0)
    approve(natted, used, None)
    natted.decide(from_server(S1), 3.0)
    assert retired_binds(natted) == [used]
    fw = natted.open_firewall_session(C2, "alice", 2.0)
    socks = natted.bind_for_client(fw.id, TCP, EXT4, 2.0)
    natted.expire(10**6)
    assert retired_binds(natted) == []  # not retired a second time
    assert socks.state is BindState.PENDING


def test_withdraw_bind_closes_it_and_leaves_nothing_to_retire(natted: Engine) -> None:
    natted.bind_for_securenat(securenat(natted, C1), TCP, PORT, 2.0)
    bind, _ = natted.bind_for_securenat(securenat(natted, C2), TCP, PORT, 2.0)
    assert bind.pooled and natted.bind_ports.in_use == 1
    natted.withdraw_bind(bind)
    assert bind.state is BindState.CLOSED and natted.bind_ports.in_use == 0
    assert natted.binds.leading_to(TCP, C2, PORT) is None
    assert retired_binds(natted) == []
    natted.expire(10**6)  # no longer expiring either
    assert [b.client for b in retired_binds(natted)] == [C1]


def test_ending_the_session_closes_its_binds(engine: Engine) -> None:
    session = securenat(engine)
    tcp, _ = engine.bind_for_securenat(session, TCP, PORT, 2.0)
    udp, _ = engine.bind_for_securenat(session, UDP, PORT, 2.0)
    approve(engine, udp, None)
    others, _ = engine.bind_for_securenat(securenat(engine, C2), TCP, PORT, 2.0)
    engine.end_session(session, 3.0)
    assert tcp.state is udp.state is BindState.CLOSED and others.state is BindState.PENDING
    assert engine.binds.leading_to(UDP, C1, PORT) is None
    assert engine.decide(from_server(S1, proto=UDP), 4.0).verdict is Verdict.DROP
    assert udp.admitted == 0
    assert retired_binds(engine) == ([tcp, udp] if engine.nat else [])
    engine.expire(10**6)
    assert retired_binds(engine) == ([others] if engine.nat else [])


# --- application filters on primaries -------------------------------------------------------------

def test_primaries_of_a_watched_protocol_run_in_user_mode() -> None:
    engine = make_engine(nat=True, app_filters={"FTP": "ftp", "DNS": "dnswatch"})
    ftp = engine.decide(pkt(str(C1), str(S1), 21), 1.0)
    assert ftp.verdict is Verdict.ADMIT_USER and ftp.protocol == "FTP" and ftp.snat == 0
    record = engine.flows.get(ftp.key)
    assert record is not None and record.mode is Mode.USER and record.app_filter == "ftp"
    assert record.to_dict()["app_filter"] == "ftp"
    http = engine.decide(pkt(str(C1), str(S1), 80), 1.0)
    assert http.verdict is Verdict.ADMIT_KERNEL
    http_record = engine.flows.get(http.key)
    assert http_record is not None and http_record.app_filter is None and http_record.mode is Mode.KERNEL
    # a UDP primary too, and its next datagram gets the same verdict
    dns = engine.decide(pkt(str(C1), str(S1), 53, proto=UDP), 1.0)
    assert dns.verdict is Verdict.ADMIT_USER
    assert engine.decide(pkt(str(C1), str(S1), 53, proto=UDP), 1.5).verdict is Verdict.ADMIT_USER
    # a secondary connection of the protocol is no primary: kernel mode, no application filter
    perm = engine.allow_future_connect(ftp.session_id or 0, S1, 20021, TCP, Flags(0), FTP, 2.0)
    data = engine.decide(pkt(str(C1), str(S1), 20021, sport=40001), 2.0)
    assert data.verdict is Verdict.ADMIT_KERNEL and data.action_id == perm.id
    data_record = engine.flows.get(data.key)
    assert data_record is not None and data_record.app_filter is None


def test_a_firewall_client_s_primary_is_watched_too() -> None:
    engine = make_engine(nat=True, app_filters={"FTP": "ftp"})
    session = engine.open_firewall_session(C1, "alice", 1.0).id
    d = engine.client_connect(session, TCP, S1, 21, 40000, 2.0)
    assert d.verdict is Verdict.ADMIT_USER
    assert list(engine.recent) == [d]
    record = engine.flows.get(d.key)
    assert record is not None and record.app_filter == "ftp"


def test_without_app_filters_primaries_stay_in_kernel_mode() -> None:
    engine = make_engine(nat=True)
    d = engine.decide(pkt(str(C1), str(S1), 21), 1.0)
    record = engine.flows.get(d.key)
    assert d.verdict is Verdict.ADMIT_KERNEL and record is not None and record.app_filter is None


# --- found bugs -----------------------------------------------------------------------------------

def test_an_external_datagram_with_an_internal_flow_s_key_is_dropped(natted: Engine) -> None:
    first = natted.decide(pkt(str(C1), str(S1), 53, proto=UDP, sport=5353), 1.0)
    assert first.verdict is Verdict.ADMIT_KERNEL
    spoofed = PacketMeta(first.key, Ingress.EXTERNAL, 0)
    assert natted.decide(spoofed, 1.5).verdict is Verdict.DROP
