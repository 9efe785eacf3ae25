"""An agent's capture as it stops (``testbed.agent._SniffState.drain``): what its socket
still holds from before the stop is kept, what came after is not the capture's, and what
it cannot read in time counts as lost. A datagram socket pair stands in for the capture
socket (no root)."""

from __future__ import annotations

import socket
import time
import types
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Packet

from testbed import agent


def stamped(port: int, at: float) -> Packet:
    pkt = IP(dst="192.0.2.2") / UDP(dport=port)
    pkt.time = at
    return pkt


def capture(queued: list[Packet]) -> tuple[agent._SniffState, socket.socket]:
    """A stopped capture whose socket holds ``queued`` (one datagram each), read in order."""
    ins, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for _ in queued:
        sender.send(b"x")
    packets: Iterator[Packet] = iter(queued)

    def recv() -> Packet:
        ins.recv(1)
        return next(packets)

    st = agent._SniffState()
    st.socket = types.SimpleNamespace(ins=ins, recv=recv)
    return st, sender


def test_a_stopping_capture_keeps_what_came_before_its_stop_only() -> None:
    stop = time.time()
    st, sender = capture([stamped(1, stop - 2), stamped(2, stop - 1), stamped(3, stop + 1),
                          stamped(4, stop + 2)])
    st.drain(stop)
    assert [(name, agent._unb64(data)) for name, data, _ in st.packets] == \
        [("IP", bytes(stamped(1, 0))), ("IP", bytes(stamped(2, 0)))]
    assert st.lost == 0
    sender.close()
    st.socket.ins.close()


def test_what_a_stopping_capture_cannot_read_in_time_counts_as_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "DRAIN_LIMIT", 0.0)
    stop = time.time()
    st, sender = capture([stamped(n, stop - 1) for n in range(5)])
    st.drain(stop)
    assert st.packets == [] and st.lost == 5
    sender.close()
    st.socket.ins.close()
