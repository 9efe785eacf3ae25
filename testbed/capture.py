"""Per-test packet capture on the firewall namespace.

``FwCapture(netns, path)`` runs
``tcpdump -i any -U --immediate-mode -y LINUX_SLL2 -s SNAPLEN -B BUFFER_KIB -w path`` inside
``netns`` (Linux cooked capture v2 records the interface of every packet), waits
until tcpdump reports that it is listening, and ``stop()`` ends it with SIGINT
so the pcap is complete. ``FwPackets`` reads such a pcap while it grows, as a
sniffer for ``testbed.checks``: what the host received on one interface, say, or
what it sent.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["SLL2_OUTGOING", "CaptureError", "FwCapture", "FwPackets", "PcapTail", "dropped_count",
           "pcap_tail", "relied_on_for_absence"]

# The capture's snapshot length and kernel buffer (KiB). In immediate mode libpcap gives
# each packet a ring slot of the snapshot length: whole 64 KiB packets (GRO's) left 128
# slots in 8 MiB, and a bulk transfer or a flood through the fw overran them on a loaded
# machine (tcpdump said "dropped by kernel" in 64 checks of one full run). What a check
# reads of the fw's capture is headers, a probe, an answer, a control line or an ICMP error
# (which quotes at most 1280 bytes, RFC 4443): 2048 bytes hold each whole; a transfer's
# bulk data is compared at its ends, by digest. These leave about 7800 slots.
SNAPLEN = 2048
BUFFER_KIB = 16384
# How long to wait for tcpdump to say it is listening.
START_TIMEOUT = 10.0
# How long to wait for tcpdump to exit after SIGINT before killing it.
STOP_TIMEOUT = 5.0


class CaptureError(RuntimeError):
    """tcpdump is missing, failed to start, or did not stop."""


class FwCapture:
    """tcpdump on every interface of ``netns``, written to ``path``; a context manager."""

    def __init__(self, netns: str, path: Path | str, *, snaplen: int = SNAPLEN) -> None:
        self.netns = netns
        self.path = Path(path)
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._listening = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.returncode: int | None = None
        self._start(snaplen)

    def _start(self, snaplen: int) -> None:
        tcpdump = shutil.which("tcpdump") or next(
            (p for p in ("/usr/sbin/tcpdump", "/usr/bin/tcpdump", "/sbin/tcpdump")
             if os.access(p, os.X_OK)),
            None,
        )
        if tcpdump is None:
            raise CaptureError(
                "tcpdump not found: install the 'tcpdump' package "
                "(Debian/Ubuntu: apt-get install -y tcpdump)"
            )
        if shutil.which("ip") is None:
            raise CaptureError("'ip' not found: install the 'iproute2' package")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            "ip", "netns", "exec", self.netns,
            tcpdump, "-i", "any", "-U", "--immediate-mode", "-n", "-y", "LINUX_SLL2",
            "-s", str(snaplen), "-B", str(BUFFER_KIB), "-Z", "root", "-w", str(self.path),
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True,
                                        name=f"tcpdump-{self.netns}")
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening.wait(0.02):
            if self._proc.poll() is not None:
                self._reader.join(1.0)
                self.returncode = self._proc.returncode
                raise CaptureError(
                    f"tcpdump in netns {self.netns} exited with status {self.returncode} "
                    f"before listening:{self._stderr_text()}"
                )
            if time.monotonic() > deadline:
                self._terminate()
                raise CaptureError(
                    f"tcpdump in netns {self.netns} did not report listening within "
                    f"{START_TIMEOUT:g} s:{self._stderr_text()}"
                )

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in self._proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self._stderr.append(line)
                if "listening on" in line:
                    self._listening.set()

    def _stderr_text(self) -> str:
        lines = list(self._stderr)
        return ("\n  " + "\n  ".join(lines)) if lines else " (no output)"

    @property
    def output(self) -> list[str]:
        """tcpdump's stderr lines so far (start banner, and packet counts after stop)."""
        return list(self._stderr)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(2.0)
        if proc.stderr is not None:
            with contextlib.suppress(OSError):
                proc.stderr.close()
        self.returncode = proc.returncode

    def stop(self) -> Path:
        """Stop tcpdump (SIGINT, then kill after a bounded wait); return the pcap path."""
        self._terminate()
        return self.path

    @property
    def dropped(self) -> int | None:
        """The packets the capture lost (tcpdump's "dropped by kernel" and "dropped by
        interface" counts, as it says them when it stops), or None before it has said them
        (running, or killed)."""
        return dropped_count(self._stderr)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<FwCapture netns={self.netns} path={self.path} {state}>"


# tcpdump's last words: "N packets dropped by kernel" (and, where the interface counts its
# own, "N packets dropped by interface")
_DROPPED = re.compile(r"(\d+) packets? dropped by (?:kernel|interface)")


def dropped_count(lines: Iterable[str]) -> int | None:
    """The packets tcpdump says it lost, from its stderr lines: its "dropped by kernel" and
    "dropped by interface" counts, summed; None when it has said none (still running,
    or killed)."""
    counts = [int(m.group(1)) for line in lines if (m := _DROPPED.fullmatch(line.strip()))]
    return sum(counts) if counts else None


# LINUX_SLL2's packet type of a packet the capturing host sent (others it received)
SLL2_OUTGOING = 4


class PcapTail:
    """A pcap that tcpdump may still be writing, read as it grows: each ``read()`` dissects
    only the complete records written since the last (a check polls its captures every
    few milliseconds; reading the whole file each time kept a core busy on long
    transfers). A file replaced under the same path (another capture) is read anew."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._reader: Any = None
        self._inode: int | None = None
        self._packets: list[Any] = []
        self._lock = threading.Lock()

    def read(self) -> list[Any]:
        """Every complete record so far, as CookedLinuxV2 packets with ``.time`` set; none
        before tcpdump has written the file's header."""
        with self._lock:
            if not self._open():
                return []
            from scapy.layers.l2 import CookedLinuxV2

            f = self._reader.f
            while True:
                at = f.tell()
                record = next(self._reader, None)
                if record is None or len(record[0]) < record[1].caplen:  # tcpdump is writing it
                    f.seek(at)
                    break
                data, meta = record
                pkt = CookedLinuxV2(data)
                pkt.time = meta.sec + meta.usec / 1e6
                self._packets.append(pkt)
            return list(self._packets)

    def _open(self) -> bool:
        """Whether there is a pcap to read: (re)opened when it is new under the path."""
        from scapy.error import Scapy_Exception
        from scapy.utils import RawPcapReader

        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        if self._reader is not None and stat.st_ino == self._inode:
            return True
        self.close()
        if stat.st_size < PCAP_HEADER:
            return False
        try:
            self._reader = RawPcapReader(str(self.path))
        except (FileNotFoundError, Scapy_Exception):
            return False
        self._inode = stat.st_ino
        return True

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._inode, self._packets = None, None, []


# A pcap file's global header (bytes)
PCAP_HEADER = 24
# The pcaps read as they grow (a check's fw capture, read by several FwPackets), the most
# recent last; older ones are closed
_TAILS: collections.OrderedDict[Path, PcapTail] = collections.OrderedDict()
_TAILS_KEPT = 4
_TAILS_LOCK = threading.Lock()


def pcap_tail(path: Path | str) -> PcapTail:
    """The one reader of the pcap at ``path`` in this process."""
    key = Path(path)
    with _TAILS_LOCK:
        tail = _TAILS.pop(key, None) or PcapTail(key)
        _TAILS[key] = tail
        while len(_TAILS) > _TAILS_KEPT:
            _TAILS.popitem(last=False)[1].close()
        return tail


# The pcaps a check concluded from by what they did not show (a negative check): one
# that tcpdump then says lost packets cannot support it (``relied_on_for_absence``)
_ABSENCES: set[Path] = set()


def relied_on_for_absence(path: Path | str) -> bool:
    """Whether a check concluded from what the pcap at ``path`` did not show (since the
    last asking: it is forgotten then)."""
    key = Path(path)
    found = key in _ABSENCES
    _ABSENCES.discard(key)
    return found


class FwPackets:
    """The packets of a growing FwCapture pcap that ``keep`` accepts: a sniffer for
    testbed.checks (``packets()``, ``label``; ``absence_relied_on()``, which a negative
    check calls)."""

    def __init__(self, path: Path | str, label: str, keep: Callable[[Any], bool]) -> None:
        self.path = Path(path)
        self.label = f"{label} (pcap {self.path})"
        self.keep = keep

    def packets(self) -> list[Any]:
        return [p for p in pcap_tail(self.path).read() if self.keep(p)]

    def absence_relied_on(self) -> None:
        """A check concluded from what this capture did not show: a loss tcpdump reports
        when it stops makes that check fail (tcpdump tells none while it runs)."""
        _ABSENCES.add(self.path)

    def __repr__(self) -> str:
        return f"<FwPackets {self.label}>"
