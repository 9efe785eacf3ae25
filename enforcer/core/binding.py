"""Binds: BindForClient, a SecureNAT client's bind, RetroactiveAllowBind, and what a
closed bind leaves for the shell to undo."""

from __future__ import annotations

import uuid

from enforcer.core.binds import Bind, BindState
from enforcer.core.effects import ForgetBindFlows, GrowReceiveBuffer, MapBind, UnmapBind
from enforcer.core.flags import Flags
from enforcer.core.fwports import NOTHING_LISTENS, Listening, privileged
from enforcer.core.grants import Grants
from enforcer.core.ipfilter import IpFilter
from enforcer.core.packet import PROTOCOL_NAMES, TCP, UDP, IPAddress
from enforcer.core.results import InvalidArgument, IsBusy, NotFound, PolicyRulesDenied, Terminating

# The flags RetroactiveAllowBind takes
BIND_FLAGS = Flags.BIDIRECTIONAL | Flags.INCREASE_RECEIVE_BUFFER


class Binding(Grants):
    """The binds of sessions, from their making to their end."""

    def bind_for_client(self, session_id: int, protocol: int, address: IPAddress, now: float) -> Bind:
        """BindForClient: a port on the fw's external ``address`` for the session's client
        (the shell then binds it). Granted at once; what arrives for it is discarded
        until RetroactiveAllowBind. Raises IsBusy at a binds cap or when no bind port is
        free (nor held on that address by a SecureNAT bind, which may keep its client's
        port there)."""
        session = self._in_use(session_id, now)
        self.binds.check(session.client)
        port = self.bind_ports.allocate(1, lambda p: self.binds.at(protocol, address, p) is not None,
                                        f"held by binds on {address}")
        return self.binds.add(session.id, protocol, address, port, now, session.client)

    def bind_for_securenat(self, session_id: int, protocol: int, client_port: int,
                           now: float, listening: Listening = NOTHING_LISTENS, *,
                           from_fw: bool = False) -> tuple[Bind, bool]:
        """Make a SecureNAT client's port reachable from outside, for one flow, once
        RetroactiveAllowBind approves it (an application filter calls this for active
        FTP, say). Routed: the bind is the client's own address and port. NAT: an
        external address of the fw, and the client's port if no other bind holds it there
        (the shell maps it to the client), else a port from the bind pool. The client's
        port is kept inside the fw's port ranges too (the redirect pools are ports of its
        internal addresses; a bind-pool port is given out avoiding binds): a TFTP server
        answers the port the request came from, which the fw's source NAT keeps, so a
        TFTP client's bind must be on that port. The same client port asked again gives
        the same open bind. Unused, it expires after
        the permission timeout. Returns the bind and whether it is new.

        ``from_fw``: the flow is to reach the client from the fw's address on the
        client's network (``Bind.source``; the shell has the kernel translate it), for
        a client that sees only the fw (its primary came by a redirect). Its peer sees
        only the fw too (a redirected flow leaves from an external address of the fw), so
        the bind is then on an external address of the fw, as in NAT, in a routed fw
        too. The same client port bound with the other choice is IsBusy.

        On the fw's address it never takes a privileged port of the fw or one that
        ``listening`` (the fw's sockets) covers on that address (rule 14): a privileged
        or listened client port is InvalidArgument; a pool port given out is never a
        listened one."""
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        if not 1 <= client_port <= 65535:
            raise InvalidArgument(f"the client port must be 1-65535, not {client_port}")
        session = self._in_use(session_id, now)
        self.expire_binds(now)
        if session.kind != "securenat":
            raise InvalidArgument(f"session {session.id} is a Firewall client's: it binds "
                                  "through the fw itself (SOCKS BIND)")
        source = self._internal_address_for(session.client) if from_fw else None
        existing = self.binds.leading_to(protocol, session.client, client_port)
        if existing is not None and existing.session_id == session.id:
            if existing.source != source:
                raise IsBusy(f"{session.client} port {client_port} is bound already, "
                             f"{'not ' if source is not None else ''}to be reached from the fw")
            return existing, False
        self.binds.check(session.client)
        expires = now + self.policy.defaults.permission_timeout
        address, port, pooled = session.client, client_port, False
        if self.nat or source is not None:
            external = self.external_address(session.client.version)
            if external is None:
                raise InvalidArgument(f"the firewall has no external IPv{session.client.version} "
                                      "address to bind on")
            address = external
            if privileged(port):
                raise InvalidArgument(f"port {port} of the firewall's {address} is privileged: "
                                      "no bind takes it")
            if self.binds.at(protocol, address, port) is not None:
                port = self.bind_ports.allocate(
                    1, lambda p: listening.covers(protocol, external, p)
                    or self.binds.at(protocol, external, p) is not None,
                    f"listened on or held by binds on {external}")
                pooled = True
            elif listening.covers(protocol, address, port):
                raise InvalidArgument(f"the firewall listens on {PROTOCOL_NAMES[protocol]} "
                                      f"{address} port {port}: no bind takes it")
        elif self.binds.at(protocol, address, port) is not None:
            raise IsBusy(f"{session.client} port {client_port} is bound already")
        bind = self.binds.add(session.id, protocol, address, port, now, session.client,
                              client=session.client, client_port=client_port, expires=expires,
                              pooled=pooled, source=source)
        self._expiring_binds[bind.id] = bind
        if bind.translated:
            self.effects.append(MapBind(bind))
        return bind, True

    def expire_binds(self, now: float) -> None:
        """Close the SecureNAT binds whose time is up (the timer's, and what a bind call
        does first: a bind expired but not yet swept is neither given out nor approved)."""
        while self._expiring_binds:  # in the order they expire: one timeout for all
            bind = next(iter(self._expiring_binds.values()))
            if bind.expires is None or bind.expires > now:
                break
            self.bind_done(bind)

    def withdraw_bind(self, bind: Bind) -> None:
        """A bind whose part in the kernel the shell could not make: gone, with nothing
        of it to undo in the kernel."""
        self.bind_done(bind)
        self.effects = [e for e in self.effects
                        if not (isinstance(e, (MapBind, UnmapBind)) and e.bind is bind)]

    def heard(self, bind: Bind, peer: IPAddress, port: int, now: float) -> None:
        """A datagram from ``peer`` reached a UDP bind: the client may answer it (with
        BIDIRECTIONAL) for a while."""
        bind.heard(peer, port, now)

    def retroactive_allow_bind(self, session_id: int, protocol: int, address: IPAddress | None,
                               port: int, protocol_guid: uuid.UUID, flags: Flags,
                               ipfilter: IpFilter | None, now: float) -> tuple[Bind, bool]:
        """Approve a bind of the session (``address`` None: the any-address): (the bind,
        True for S_OK) or (the bind, False for S_FALSE: it was approved already).

        Raises InvalidArgument, NotFound, Terminating or PolicyRulesDenied.
        """
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"the port must be nonzero (1-65535), not {port}")
        if flags & ~BIND_FLAGS:
            names = ", ".join(f.name or "" for f in Flags if f in flags & ~BIND_FLAGS)
            raise InvalidArgument(f"RetroactiveAllowBind does not take {names}")
        if Flags.BIDIRECTIONAL in flags and protocol == TCP:
            raise InvalidArgument("BIDIRECTIONAL is for UDP only")
        session = self._in_use(session_id, now)
        self.expire_binds(now)
        protocol_def = self.protocols_by_guid.get(protocol_guid)
        if protocol_def is None:
            raise InvalidArgument(f"no protocol is defined with GUID {protocol_guid}")
        bind = self.binds.of_session(session.id, protocol, address, port)
        if bind is None:
            where = "any address" if address is None else str(address)
            raise NotFound(f"session {session.id} has no {PROTOCOL_NAMES[protocol]} bind on "
                           f"{where} port {port}")
        if bind.state is BindState.CLOSED:
            raise Terminating(f"bind {bind.id} is closed")
        allowed, why = self.protocol_verdict(protocol_def.name, session.client, session.user)
        if not allowed:
            raise PolicyRulesDenied(why)
        if bind.state is BindState.ALLOWED:
            return bind, False
        bind.state = BindState.ALLOWED
        bind.flags = flags
        bind.ipfilter = None if ipfilter is None else ipfilter.clone()
        bind.protocol_name = protocol_def.name
        if Flags.INCREASE_RECEIVE_BUFFER in flags and protocol == UDP:
            self.effects.append(GrowReceiveBuffer(bind))
        return bind, True

    def bind_done(self, bind: Bind) -> None:
        """The bind took its connection (TCP), or its association ended: it is closed and
        its port goes back to the pool (a connection it took keeps its socket). What the
        kernel holds for it is due for removal (an effect): a SecureNAT
        bind's NAT (``Bind.translated``), and the flows a Firewall client's UDP bind
        admitted (the kernel passes their datagrams to its socket; none may reach the
        port's next bind)."""
        if bind.state is not BindState.CLOSED:
            self.binds.close(bind)
            if bind.pooled:
                self.bind_ports.release(bind.port)
            self._expiring_binds.pop(bind.id, None)
            if bind.translated:
                self.effects.append(UnmapBind(bind))
            elif not bind.for_securenat and bind.protocol == UDP and bind.admitted:
                self.effects.append(ForgetBindFlows(bind))
