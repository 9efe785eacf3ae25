"""Worker processes, the parts that need no root: which user-mode flows the core hands to
a worker (and the mark that sends their packets there), a worker's core deciding a handed
flow's packets, what goes back (figures, flows let go), the messages between the
processes, the config. (The kernel's rules for the workers' queues: test_dataplane_rules.)"""

from __future__ import annotations

import ipaddress
import logging
import pickle
import re
import socket
import subprocess
import time
import types
from collections import Counter
from pathlib import Path

import pytest
from core_policy import GUID, INTERNAL, POLICY
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Packet, Raw

from enforcer import worker as worker_process
from enforcer import workers
from enforcer.config import ConfigError
from enforcer.config import load as load_config
from enforcer.core import marks
from enforcer.core.decisions import QueuedPacket
from enforcer.core.effects import HandOver, LetGo
from enforcer.core.engine import Engine
from enforcer.core.flags import Flags
from enforcer.core.flows import FlowRecord
from enforcer.core.packet import TCP as TCP_PROTOCOL
from enforcer.core.packet import UDP as UDP_PROTOCOL
from enforcer.core.packet import Ingress

ip = ipaddress.ip_address
C1, S1, FW_INT, EXT = "192.0.2.11", "198.51.100.21", "192.0.2.1", "198.51.100.1"
ROUTER = "198.51.100.254"
FTP = GUID["FTP"]
USER = marks.mark_for(True, False, None)


def engine_with_workers(*ready: int) -> Engine:
    engine = Engine(POLICY, INTERNAL, [ip(EXT)], data_filters=["upper", "ftp"],
                    internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    engine.workers = ready  # ("ftp", a filter name, stands for an application filter)
    assert engine.handle(inside(IP(src=C1, dst=S1) / TCP(sport=1, dport=21, flags="S")), 0.0).accept
    return engine


def inside(pkt: Packet, mark: int = 0) -> QueuedPacket:
    return QueuedPacket(bytes(pkt), mark=mark, ingress=Ingress.INTERNAL, interface="int0")


def outside(pkt: Packet, mark: int = 0) -> QueuedPacket:
    return QueuedPacket(bytes(pkt), mark=mark, ingress=Ingress.EXTERNAL, interface="ext0")


def syn(sport: int, dport: int) -> QueuedPacket:
    return inside(IP(src=C1, dst=S1) / TCP(sport=sport, dport=dport, flags="S", seq=0))


def grant(engine: Engine, port: int, flags: Flags = Flags.NO_KERNEL_MODE, protocol: int = TCP_PROTOCOL,
          data_filter: str | None = None) -> None:
    engine.allow_future_connect(1, ip(S1), port, protocol, flags, FTP, 1.0, data_filter=data_filter)


def test_user_mode_flows_go_to_the_ready_workers_in_turn_with_their_number_in_the_mark() -> None:
    engine = engine_with_workers(1, 2)
    for port in (2000, 2001, 2002):
        grant(engine, port)
    grant(engine, 2003, Flags(0))  # kernel mode: its later packets are the kernel's
    answers = [engine.handle(syn(5000 + i, 2000 + i), 1.0) for i in range(4)]
    assert all(a.accept for a in answers)
    assert [a.mark for a in answers] == [USER | marks.worker_mark(1), USER | marks.worker_mark(2),
                                         USER | marks.worker_mark(1), marks.mark_for(False, False, None)]
    # each user-mode flow's record is handed over before its verdict leaves
    handed = [[e for e in a.effects if isinstance(e, HandOver)] for a in answers]
    assert [[(h.record.key.dport, h.worker) for h in hs] for hs in handed] == \
        [[(2000, 1)], [(2001, 2)], [(2002, 1)], []]
    assert all(isinstance(h.record, FlowRecord) and h.record.worker == h.worker
               for hs in handed for h in hs)


@pytest.mark.parametrize(("what", "protocol", "data_filter", "handed"), [
    ("a UDP flow without a filter", UDP_PROTOCOL, None, True),
    ("a TCP flow with a data filter (its held bytes are the main process's budget)",
     TCP_PROTOCOL, "upper", False),
    ("a TCP flow with an application filter (it calls the session API)", TCP_PROTOCOL, "ftp", False),
])
def test_which_flows_a_worker_can_carry(what: str, protocol: int, data_filter: str | None,
                                        handed: bool) -> None:
    engine = engine_with_workers(1)
    grant(engine, 2000, protocol=protocol, data_filter=data_filter)
    first = (IP(src=C1, dst=S1) / (TCP(sport=5000, dport=2000, flags="S") if protocol == TCP_PROTOCOL
                                   else UDP(sport=5000, dport=2000) / Raw(b"x")))
    answer = engine.handle(inside(first), 1.0)
    assert answer.accept, what
    assert (answer.mark & marks.MARK_WORKER == marks.worker_mark(1)) is handed, what
    assert any(isinstance(e, HandOver) for e in answer.effects) is handed, what


def test_flows_that_stay_in_the_main_process() -> None:
    """No worker ready; a user-mode redirect (its client's packets come before conntrack)."""
    engine = engine_with_workers()
    grant(engine, 2000)
    answer = engine.handle(syn(5000, 2000), 1.0)
    assert answer.accept and answer.mark == USER and answer.effects == ()
    engine.workers = (1,)
    (_, port), _ = engine.redirect_connections(1, [(ip(S1), 8080)], TCP_PROTOCOL,
                                                Flags.NO_KERNEL_MODE, FTP, 1.0)
    redirected = engine.handle(QueuedPacket(bytes(IP(src=C1, dst=FW_INT) / TCP(sport=4000, dport=port,
                                                                                flags="S")),
                                            0, 0, Ingress.INTERNAL, "int0"), 1.0)
    assert redirected.accept and redirected.mark is not None
    assert redirected.mark & marks.MARK_WORKER == 0 and redirected.effects == ()


def handed_over(engine: Engine, port: int = 2000, data_filter: str | None = None) -> FlowRecord:
    grant(engine, port, data_filter=data_filter)
    answer = engine.handle(syn(5000, port), 1.0)
    (effect,) = [e for e in answer.effects if isinstance(e, HandOver)]
    return effect.record


def test_a_worker_decides_the_packets_of_the_flow_it_was_handed() -> None:
    """The record as pickled across; the worker's core then passes and counts the flow's
    packets both ways, and drops one of a flow it does not hold."""
    main = engine_with_workers(1)
    record = pickle.loads(pickle.dumps(handed_over(main)))
    worker = Engine(POLICY, INTERNAL, [ip(EXT)], internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    mark = USER | marks.worker_mark(1)
    stray = IP(src=C1, dst=S1) / TCP(sport=5000, dport=2000, flags="PA", seq=1, ack=1) / Raw(b"hello")
    assert not worker.handle(inside(stray, mark), 1.05).accept  # not handed yet: fail closed
    worker.take_over(record, 1.0)
    assert record.worker == 0  # its own, there
    reply = IP(src=S1, dst=C1) / TCP(sport=2000, dport=5000, flags="SA", seq=0, ack=1)
    assert worker.handle(outside(reply, mark), 1.1).accept
    answer = worker.handle(inside(stray, mark), 1.2)
    assert answer.accept and answer.packet is None and answer.mark is None
    assert (record.packets_out, record.packets_back) == (2, 1)
    assert worker.counters["user-mode packets"] == 3


def test_a_worker_decides_on_the_bytes_its_queue_copies() -> None:
    """A worker's queue copies COPY_RANGE bytes of each packet: a GSO packet's headers are
    enough (it passes as it came, counted at its whole length, its FIN seen), and so is an
    ICMP error about the flow (at most 576 bytes in IPv4, 1280 in IPv6)."""
    main = engine_with_workers(1)
    record = pickle.loads(pickle.dumps(handed_over(main)))
    worker = Engine(POLICY, INTERNAL, [ip(EXT)], internal_addresses=[ipaddress.ip_interface(f"{FW_INT}/24")])
    worker.take_over(record, 1.0)
    mark = USER | marks.worker_mark(1)
    big = bytes(IP(src=C1, dst=S1) / TCP(sport=5000, dport=2000, flags="FA", seq=1, ack=1)
                / Raw(b"x" * 60_000))
    answer = worker.handle(QueuedPacket(big[:worker_process.COPY_RANGE], mark=mark,
                                        ingress=Ingress.INTERNAL, interface="int0", length=len(big),
                                        checksum_ready=False, gso=True), 1.1)
    assert answer.accept and answer.packet is None, answer.reason
    assert (record.packets_out, record.bytes_out, record.fins) == (2, 40 + len(big), 1)
    # as long as a router makes one (RFC 1812: as much of the packet as fits in 576 bytes)
    quoted = IP(src=C1, dst=S1) / TCP(sport=5000, dport=2000, flags="A") / Raw(b"y" * 508)
    error = IP(src=ROUTER, dst=C1) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted
    assert len(error) == 576 <= worker_process.COPY_RANGE
    answer = worker.handle(outside(error, mark), 1.2)
    assert answer.accept and answer.reason == f"an ICMP error about {record.key}", answer.reason


def test_what_a_worker_saw_comes_back_and_keeps_the_flow() -> None:
    main = engine_with_workers(1)
    record = handed_over(main)
    copy = pickle.loads(pickle.dumps(record))
    copy.saw(False, 1500, 500.0)
    copy.saw(True, 100, 600.0)
    main.worker_saw([(copy.key, copy.admitted_at, copy.figures())])
    assert (record.packets_out, record.bytes_out, record.packets_back, record.bytes_back,
            record.last_seen, record.confirmed) == (2, 140, 1, 1500, 600.0, True)
    # conntrack's SYN timeouts would have let it go by 1.0 + 120 s; its last packet keeps it
    main.expire(590.0)
    assert main.flows.find_held(record.key) is not None
    # figures of an earlier admission of the same key change nothing
    main.worker_saw([(copy.key, copy.admitted_at - 1, copy.figures()._replace(packets_out=99))])
    assert record.packets_out == 2


def test_a_flow_let_go_is_let_go_in_its_worker_too() -> None:
    main = engine_with_workers(1, 2)
    record = handed_over(main)
    main.flows.remove(record, 2.0)
    assert main.take_effects() == [LetGo(record.key, record.admitted_at, 1)]
    worker = Engine(POLICY, INTERNAL, [ip(EXT)])
    held = pickle.loads(pickle.dumps(record))
    worker.take_over(held, 1.0)
    worker.let_go(record.key, record.admitted_at - 1, 2.0)  # another admission's: kept
    assert worker.flows.find_held(record.key) is not None
    worker.let_go(record.key, record.admitted_at, 2.0)
    assert worker.flows.find_held(record.key) is None
    assert worker.take_effects() == []  # the worker tells no one


def test_messages_cross_a_socket_pair_and_reports_are_cut() -> None:
    ours, theirs = workers.socket_pair()
    try:
        main = engine_with_workers(1)
        record = handed_over(main)
        workers.send(ours, ("add", [record]))
        workers.send(ours, ("forget", record.key, record.admitted_at))
        ours.close()
        got = list(workers.receive(theirs))
        assert [m if m is None else m[0] for m in got] == ["add", "forget", None]
        assert got[0] is not None and got[0][1][0].key == record.key
    finally:
        theirs.close()
    figures = [(record.key, float(i), record.figures()) for i in range(workers.FLOWS_PER_MESSAGE + 5)]
    messages = list(workers.report_messages(figures, Counter({"user-mode packets": 7})))
    assert [len(m[1]) for m in messages] == [workers.FLOWS_PER_MESSAGE, 5]
    assert [m[2] for m in messages] == [Counter(), Counter({"user-mode packets": 7})]
    # (IPv4 keys here; an IPv6 one pickles about a fifth longer)
    assert max(len(pickle.dumps(m)) for m in messages) < 64 << 10


def config_text(dataplane: str) -> str:
    return ('[network]\ninternal_interfaces = ["int0"]\nexternal_interfaces = ["ext0"]\n'
            f"[dataplane]\n{dataplane}\n")


@pytest.mark.parametrize(("dataplane", "error"), [
    ("workers = 16", "workers: must be from 0 to 15 worker processes"),
    ("workers = -1", "workers: must be from 0 to 15"),
    ("queue = 65530\nworkers = 6", "worker queues 65531-65536 go past 65535"),
])
def test_the_config_s_workers(tmp_path: Path, dataplane: str, error: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(config_text("workers = 3"))
    assert load_config(path).dataplane.workers == 3
    path.write_text(config_text(dataplane))
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(path)


def test_a_successor_is_handed_its_predecessor_s_flows_as_its_socket_has_room() -> None:
    """Its socket holds a few messages at a time: the rest wait for a later turn, and a flow
    let go meanwhile is not sent."""
    main = engine_with_workers(1)
    for port in range(2000, 2600):  # three messages
        handed_over(main, port)
    pool = workers.WorkerPool.__new__(workers.WorkerPool)  # its socket alone, no process
    worker = workers.Worker(1, 1)
    pool.workers = {1: worker}
    ours, theirs = workers.socket_pair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 30_000)  # room for one (doubled)
        worker.socket, worker.ready = ours, True
        worker.backlog = main.flows.held_by(1)
        gone = worker.backlog[-1]
        main.flows.remove(gone, 2.0)
        pool.flush(1)
        assert pool.backlogged == [1], "the socket took everything: no turn was left for later"
        got = [r.key for m in workers.receive(theirs) if m is not None for r in m[1]]
        while pool.backlogged:
            pool.flush(1)
            got += [r.key for m in workers.receive(theirs) if m is not None for r in m[1]]
        assert len(got) == 599 and gone.key not in got
        assert sorted(k.dport for k in got) == list(range(2000, 2599))
    finally:
        ours.close()
        theirs.close()


def test_a_worker_is_silent_past_its_limit_and_killed_then() -> None:
    """Each message heard restarts the count; a starting worker has the start's time, a
    ready one the silence limit; ``kill`` ends its process whatever holds it (a stopped
    one too), and it is reaped later."""
    now = [100.0]
    pool = workers.WorkerPool.__new__(workers.WorkerPool)  # a stand-in process
    pool.clock = lambda: now[0]
    worker = workers.Worker(1, 1)
    pool.workers = {1: worker}
    ours, theirs = workers.socket_pair()
    worker.process = subprocess.Popen(["sleep", "60"])
    try:
        worker.socket, worker.heard = ours, now[0]
        now[0] += workers.SILENCE_LIMIT + 1
        assert pool.silent(now[0]) == [], "a starting worker has START_TIMEOUT"
        workers.send(theirs, ("ready",))
        assert pool.read(1) == ([("ready",)], False) and worker.ready and worker.heard == now[0]
        now[0] += workers.SILENCE_LIMIT
        assert pool.silent(now[0]) == []
        workers.send(theirs, ("seen", [], Counter()))
        pool.read(1)
        now[0] += workers.SILENCE_LIMIT + 0.5
        assert pool.silent(now[0]) == [1]
        assert pool.status()[0]["silent_s"] == workers.SILENCE_LIMIT + 0.5  # status says it
        worker.process.send_signal(19)  # SIGSTOP: it hangs
        pool.kill(1)
        assert worker.process.wait(5) == -9
        pool.lost(1)
        assert pool.silent(now[0]) == [] and worker.socket is None and not worker.ready
        assert pool.status()[0]["silent_s"] is None
        pool.due(now[0])
        assert worker.process is None, "reaped"
    finally:
        if worker.process is not None:
            worker.process.kill()
            worker.process.wait()
        theirs.close()


def test_a_worker_with_packets_held_from_its_last_turn_goes_on_without_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A turn that left packets held (its time ran out) is followed at once by the next:
    the worker's loop does not wait for its queue's socket, which may stay quiet."""
    waits: list[float] = []

    class Selector:
        def register(self, fileobj: object, events: int) -> None:
            pass

        def select(self, timeout: float) -> list[object]:
            waits.append(timeout)
            return []

    class Held:
        socket = None
        turns = 2  # the turns its held packets still need

        @property
        def waiting(self) -> bool:
            return self.turns > 0

    monkeypatch.setattr(worker_process.selectors, "DefaultSelector", Selector)
    w = worker_process.WorkerProcess.__new__(worker_process.WorkerProcess)
    w.clock, w.sock, w.queue = time.monotonic, None, Held()  # type: ignore[assignment]
    queue = w.queue

    def on_queue() -> bool:
        queue.turns -= 1  # type: ignore[attr-defined]
        return not queue.waiting

    alive = iter([True, True, True, False])  # then the main process has gone
    monkeypatch.setattr(w, "on_queue", on_queue)
    monkeypatch.setattr(w, "from_main", lambda: next(alive))
    monkeypatch.setattr(w, "report", lambda now: None)
    w.run()
    assert waits[:2] == [0.0, 0.0] and all(wait > 0 for wait in waits[2:]), waits


def test_a_worker_whose_main_process_has_gone_ends_quietly(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Its queue bound, a worker says it is ready to a main process that has gone meanwhile
    (another worker could not bind, and the start was given up): it ends with 1 and no
    traceback, its queue closed."""
    closed: list[bool] = []

    class Bound:
        def __init__(self, sock: socket.socket, setup: object, clock: object) -> None:
            self.queue = self

        def bind(self) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    main_side, worker_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    workers.send(main_side, ("setup", types.SimpleNamespace(log_level=logging.WARNING, index=2)))
    main_side.close()
    monkeypatch.setattr(worker_process, "WorkerProcess", Bound)
    monkeypatch.setattr(worker_process.daemon, "settle_heap", lambda: None)
    monkeypatch.setattr(worker_process.signal, "signal", lambda *args: None)
    assert worker_process.main([str(worker_side.detach())]) == 1  # (its socket has the fd now)
    assert closed == [True] and "Traceback" not in capsys.readouterr().err
