"""Grants: AllowFutureConnect and RedirectConnections, what each checks before it creates
anything, and the permissions a new flow uses."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from enforcer.core.effects import (
    AddKernelGrant,
    AddRedirect,
    GrowReceiveBuffer,
    KernelGrant,
    RemoveRedirect,
)
from enforcer.core.events import Events
from enforcer.core.flags import Flags
from enforcer.core.marks import mark_for
from enforcer.core.packet import TCP, UDP, Endpoint, FlowKey, IPAddress
from enforcer.core.permissions import Permission, PermissionKey
from enforcer.core.policy import ProtocolDef
from enforcer.core.redirects import MAX_ADDRESSES, Redirect
from enforcer.core.results import (
    InvalidArgument,
    IsBusy,
    NetworkRulesDenied,
    PolicyRulesDenied,
    Terminating,
)
from enforcer.core.sessions import Session
from enforcer.core.state import permission_key, redirect_key, user_mode

# The flags RedirectConnections takes (its page lists no others)
REDIRECT_FLAGS = Flags.ALLOW_MULTIPLE | Flags.TIMEOUT | Flags.NO_KERNEL_MODE | Flags.INCREASE_RECEIVE_BUFFER
# The flags a grant tests, as plain ints: tested in C (``Flags.X in flags`` runs the enum's
# Python code, its member lookup too)
_ALLOW_MULTIPLE, _TIMEOUT, _BIDIRECTIONAL, _INCREASE_RECEIVE_BUFFER = (
    int(Flags.ALLOW_MULTIPLE), int(Flags.TIMEOUT), int(Flags.BIDIRECTIONAL),
    int(Flags.INCREASE_RECEIVE_BUFFER))
# a grant with any of these stays the enforcer's to match: it admits more than one flow,
# its flows run in user mode, or another session of its client's address may use it (a
# Firewall client's, whose flows the SOCKS service relays: the enforcer matches those)
_NOT_IN_KERNEL = int(Flags.ALLOW_MULTIPLE | Flags.NO_KERNEL_MODE | Flags.ADDRESS_BASED)


# The ports of an internal address by which a client's UDP flows were redirected in the
# kernel, as conntrack holds them
KernelUdpFlows = Callable[[IPAddress, IPAddress], Iterable[int]]


def no_kernel_udp_flows(client: IPAddress, internal: IPAddress) -> Iterable[int]:
    """Where the shell tells of none (unit tests, no kernel)."""
    return ()


class Grants(Events):
    """Permissions: granted, matched by new flows, cancelled, finished."""

    def allow_future_connect(self, session_id: int, target: IPAddress, port: int, protocol: int,
                             flags: Flags, protocol_guid: uuid.UUID, now: float, *,
                             proxy_external_address: IPAddress | None = None,
                             filter_id: int | None = None, context: Any = None,
                             data_filter: str | None = None) -> Permission:
        """Grant a secondary connection from the session's client to target:port.

        Raises InvalidArgument, PolicyRulesDenied, NetworkRulesDenied or IsBusy, and
        then creates nothing.
        """
        self.permissions.expire(now)
        if int(flags) & _BIDIRECTIONAL and protocol == TCP:
            raise InvalidArgument("BIDIRECTIONAL is for UDP only")
        session, protocol_def, external_index = self._check_grant(
            session_id, [(target, port)], protocol, flags, protocol_guid, proxy_external_address,
            data_filter, now, redirect=False)
        timeout = self.policy.defaults.permission_timeout if int(flags) & _TIMEOUT else None
        perm = self.permissions.add(session.id, session.client,
                                    permission_key(protocol, session.client, target, port),
                                    flags, protocol_def.name, now, timeout, external_index,
                                    filter_id, context, data_filter)
        self._granted([perm])
        self._to_kernel(perm, session, protocol, target, port)
        return perm

    def redirect_connections(self, session_id: int, targets: list[Endpoint], protocol: int,
                             flags: Flags, protocol_guid: uuid.UUID, now: float, *,
                             proxy_external_address: IPAddress | None = None,
                             filter_id: int | None = None, context: Any = None,
                             data_filter: str | None = None,
                             kernel_udp_flows: KernelUdpFlows = no_kernel_udp_flows,
                             ) -> tuple[Endpoint, list[Permission]]:
        """Redirect connections to N consecutive ports on the fw's internal address that
        faces the session's client, port base+i to targets[i]: (InternalAddress, actions).

        A UDP block has no port through which the client's flow of an earlier redirect
        still lives: the client's datagrams to that port would go on down that flow, to
        the earlier target (conntrack knows a UDP flow by its addresses and ports alone;
        the enforcer holds a user-mode one by them). Other clients may take the port.
        ``kernel_udp_flows`` is the shell's: the ports of an internal address by which a
        client's UDP flows were redirected in the kernel, as conntrack holds them.

        Raises as allow_future_connect does (IsBusy also when no block of N ports is
        free), and then creates nothing.
        """
        self.permissions.expire(now)
        if not 1 <= len(targets) <= MAX_ADDRESSES:
            raise InvalidArgument(f"give 1 to {MAX_ADDRESSES} connect addresses, not {len(targets)}")
        if flags & ~REDIRECT_FLAGS:
            names = ", ".join(f.name or "" for f in Flags if f in flags & ~REDIRECT_FLAGS)
            raise InvalidArgument(f"RedirectConnections does not take {names}")
        session, protocol_def, external_index = self._check_grant(
            session_id, targets, protocol, flags, protocol_guid, proxy_external_address, data_filter,
            now, redirect=True)
        internal = self._internal_address_for(session.client)
        in_user_mode = user_mode(flags, data_filter)
        client = session.client
        avoid: Callable[[int], bool] | None = None
        if protocol == UDP and in_user_mode:
            def avoid(port: int) -> bool:
                return self.flows.holds_redirected(UDP, client, (internal, port))
        elif protocol == UDP:
            avoid = set(kernel_udp_flows(client, internal)).__contains__
        # the last check: nothing to undo
        base = self.pools[in_user_mode].allocate(
            len(targets), avoid, f"held by {client}'s UDP flows of earlier redirects")
        self._block_pending[(in_user_mode, base)] = len(targets)
        timeout = self.policy.defaults.permission_timeout if Flags.TIMEOUT in flags else None
        actions = []
        for i, (target, port) in enumerate(targets):
            redirect = Redirect(protocol, session.client, internal, base + i, target, port, base,
                                in_user_mode)
            actions.append(self.permissions.add(
                session.id, session.client, redirect_key(protocol, session.client, base + i), flags,
                protocol_def.name, now, timeout, external_index, filter_id, context, data_filter,
                redirect))
        self._granted(actions)
        return (internal, base), actions

    def _granted(self, perms: list[Permission]) -> None:
        """What the shell is to do for new permissions: a kernel-mode redirect's NAT, a
        larger receive buffer."""
        for perm in perms:
            if perm.redirect is not None and not perm.redirect.user_mode:
                self.effects.append(AddRedirect(perm))
            if int(perm.flags) & _INCREASE_RECEIVE_BUFFER:
                self.effects.append(GrowReceiveBuffer(perm))

    def _to_kernel(self, perm: Permission, session: Session, protocol: int, target: IPAddress,
                   port: int) -> None:
        """A single-use grant whose flow will run in kernel mode, of a SecureNAT client
        (whose flows the fw forwards), is the kernel's to match when the kernel can hold
        grants and holds none of the same key: its flow's first packet then never waits
        for the enforcer. The enforcer no longer admits a flow by it (``_match``); the
        kernel tells it of the flow it admitted (``kernel_admitted``)."""
        if (not self.grants_in_kernel or int(perm.flags) & _NOT_IN_KERNEL or perm.data_filter
                or session.kind != "securenat" or perm.key in self.kernel_grants):
            return
        one_way, snat = self._leaving(perm, protocol)
        grant = KernelGrant(perm, protocol, target, port, mark_for(False, one_way, snat))
        self.kernel_grants[perm.key] = grant
        self.effects.append(AddKernelGrant(grant))

    def kernel_used_unheard(self, grants: Iterable[KernelGrant]) -> None:
        """Grants the kernel no longer holds, though the enforcer heard of no flow by them
        (the kernel's notices of some were lost): used, by flows it does not know."""
        for grant in grants:
            if self._kernel_grant_of(grant.permission) is grant:
                self.permissions.use(grant.permission)
                self.counters["kernel grants: used, not heard of"] += 1

    def keep_grant(self, grant: KernelGrant) -> None:
        """The kernel could not hold a grant: it stays the enforcer's to match."""
        if self._kernel_grant_of(grant.permission) is grant:
            del self.kernel_grants[grant.permission.key]
            self.counters["kernel grants: kept in user space"] += 1

    def _leaving(self, perm: Permission, protocol: int, *,
                 relayed: bool = False) -> tuple[bool, int | None]:
        """How a permission's flows leave the fw: one way (a UDP grant without
        BIDIRECTIONAL, not a redirect), and the index of the external address they are
        translated to (None: untranslated; a redirected flow always is: its client spoke
        to the fw; and a flow the SOCKS service relays (``relayed``) leaves from the fw's
        address, routed too)."""
        redirect = perm.redirect is not None
        one_way = protocol == UDP and not int(perm.flags) & _BIDIRECTIONAL and not redirect
        return one_way, perm.external_index if self.nat or redirect or relayed else None

    def _check_grant(self, session_id: int, targets: list[Endpoint], protocol: int, flags: Flags,
                     protocol_guid: uuid.UUID, proxy_external_address: IPAddress | None,
                     data_filter: str | None, now: float, *,
                     redirect: bool) -> tuple[Session, ProtocolDef, int]:
        """What every grant checks, in this order; returns the session, the protocol and
        the index of the external address the flows leave from."""
        if int(flags) & _TIMEOUT and int(flags) & _ALLOW_MULTIPLE:
            raise InvalidArgument("TIMEOUT and ALLOW_MULTIPLE cannot be combined")
        if protocol not in (TCP, UDP):
            raise InvalidArgument(f"protocol must be TCP (6) or UDP (17), not {protocol}")
        for _, port in targets:
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"port {port} is outside 1-65535")
        if data_filter is not None:
            if data_filter not in self.data_filters:
                known = ", ".join(sorted(self.data_filters)) or "none are configured"
                raise InvalidArgument(f"no data filter '{data_filter}' ({known})")
            if protocol != TCP:
                raise InvalidArgument("data filters are for TCP flows")
        session = self._in_use(session_id, now)
        for target, _ in targets:
            refusal = self._target_refusal(target, session.client)
            if refusal is not None:
                raise InvalidArgument(refusal)
        # (a Firewall client's flows leave from the fw itself: the SOCKS service relays them)
        external_index = self._external_index(session.client.version, proxy_external_address,
                                              translated=self.nat or redirect or
                                              session.kind != "securenat")
        protocol_def = self.protocols_by_guid.get(protocol_guid)
        if protocol_def is None:
            raise InvalidArgument(f"no protocol is defined with GUID {protocol_guid}")
        allowed, why = self.protocol_verdict(protocol_def.name, session.client, session.user)
        if not allowed:
            raise PolicyRulesDenied(why)
        for target, _ in targets:
            denial = self.destination_denial(target)
            if denial is not None:
                raise NetworkRulesDenied(denial)
        cap = self.policy.defaults.max_pending_per_session
        if self.permissions.pending_count(session.id) + len(targets) > cap:
            self.counters["refused: max_pending_per_session"] += 1
            raise IsBusy(f"session {session.id} would have more than {cap} pending permissions")
        self.permissions.quota.check(session.client, len(targets))
        return session, protocol_def, external_index

    def _match_redirect(self, key: FlowKey, port: int, now: float,
                        where: Callable[[Redirect], bool]) -> tuple[Permission | None, str | None]:
        return self._match(redirect_key(key.protocol, key.src, port), key.src, now,
                           lambda p: p.redirect is not None and where(p.redirect))

    def _match(self, pkey: PermissionKey, client: IPAddress, now: float,
               where: Callable[[Permission], bool] | None = None) -> tuple[Permission | None, str | None]:
        """The permission a new flow of ``client`` uses (consumed if single use), or
        (None, why) when only grants the flow cannot use match: of user-mode flows, when
        the client may hold no more user-mode flows (the refusal is counted), or held by
        the kernel, which did not admit the flow (it has used the grant, or is about to
        expire it). Nothing is consumed then."""
        session = self.sessions.find(client)
        session_id = None if session is None else session.id
        fits = self.flows.fits(client)
        held_grant = self.kernel_grants.get(pkey) if self.kernel_grants else None
        if fits and held_grant is None:
            return self.permissions.match(pkey, session_id, now, where), None
        refused = held = False

        def usable(perm: Permission) -> bool:
            nonlocal refused, held
            if where is not None and not where(perm):
                return False
            if held_grant is not None and held_grant.permission is perm:
                held = True
                return False
            if not fits and user_mode(perm.flags, perm.data_filter):
                refused = True
                return False
            return True

        perm = self.permissions.match(pkey, session_id, now, usable)
        if perm is None and refused:
            return None, f"refused: {self.flows.quota.refuse(client)}"
        if perm is None and held:
            return None, ("its single-use grant is the kernel's, which did not admit this "
                          "packet: the grant is used or expires")
        return perm, None

    def pending(self, session_id: int | None, now: float) -> list[Permission]:
        self.permissions.expire(now)
        return self.permissions.pending(session_id)

    def cancel(self, action_id: int, now: float) -> Permission:
        return self.permissions.cancel(action_id, now)

    def withdraw_grant(self, perm: Permission, now: float) -> None:
        """A grant whose part in the kernel the shell could not make: cancelled (unless it
        has ended meanwhile), with nothing of it to undo in the kernel."""
        with contextlib.suppress(Terminating):
            self.cancel(perm.id, now)
        self.effects = [e for e in self.effects
                        if not (isinstance(e, RemoveRedirect) and e.permission is perm)]

    def action(self, action_id: int, now: float) -> Permission:
        self.permissions.expire(now)
        return self.permissions.get(action_id)
