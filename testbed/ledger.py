"""A ledger of everything a testbed creates, so nothing outlives its owner.

One JSON file per testbed, ``<state dir>/<id>.json`` (state dir:
``$PINHOLE_STATE_DIR`` or ``/run/pinhole/testbeds``). A namespace or process is
written to the ledger *before* it is created, so a crash at any point leaves a
record that :func:`sweep` can act on. Writes are atomic (temp file + rename)
and every read-modify-write holds an ``flock`` on the state directory.

The owner is a (pid, start time) pair: a recycled pid does not look like a live
owner. A testbed started from the CLI is ``detached`` (no owner) and is only
removed by ``pinhole testbed down`` or a sweep with ``all_=True``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = "/run/pinhole/testbeds"
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "ph-"


def state_dir() -> Path:
    """The directory holding ledgers (created if missing)."""
    d = Path(os.environ.get("PINHOLE_STATE_DIR") or DEFAULT_STATE_DIR)
    d.mkdir(parents=True, exist_ok=True)
    return d


# -- processes ---------------------------------------------------------------

def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone
    (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_alive(pid: int, start: int | None) -> bool:
    """True if ``pid`` runs and (when ``start`` is known) is the same process."""
    now = proc_start_time(pid)
    return now is not None and (start is None or now == start)


def _reap(pid: int) -> None:
    # Our own children would otherwise linger as zombies.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_pids(pids: list[tuple[int, int | None]], grace: float = 1.0) -> list[int]:
    """SIGTERM each live (pid, start); SIGKILL what is left after ``grace`` s.
    Returns the pids that were signalled."""
    live = [(p, s) for p, s in pids if p > 1 and pid_alive(p, s)]
    for p, _ in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        for p, _ in live:
            _reap(p)
        remaining = [(p, s) for p, s in live if pid_alive(p, s)]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for p, _ in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while remaining and time.monotonic() < deadline:
        for p, _ in remaining:
            _reap(p)
        remaining = [(p, s) for p, s in remaining if pid_alive(p, s)]
        if remaining:
            time.sleep(0.01)
    return [p for p, _ in live]


# -- namespaces --------------------------------------------------------------

def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def pids_in_namespace(name: str) -> list[tuple[int, int | None]]:
    """Processes whose network namespace is the named one."""
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if ns.st_ino == st.st_ino and ns.st_dev == st.st_dev:
            pid = int(entry)
            if pid != os.getpid():
                out.append((pid, proc_start_time(pid)))
    return out


def delete_namespace(name: str) -> bool:
    """Kill what runs inside the named namespace, then delete it.
    Returns False if it did not exist."""
    path = NETNS_DIR / name
    if not path.exists():
        return False
    kill_pids(pids_in_namespace(name), grace=0.5)
    r = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
    if r.returncode != 0 and path.exists():
        # e.g. a half-created namespace (file without a mount): unlink it.
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
            path.unlink()
    return True


# -- the ledger file -----------------------------------------------------------

@dataclass
class Ledger:
    """What one testbed created. Mutate through :meth:`update`."""

    id: str
    variant: str = ""
    owner_pid: int | None = None
    owner_start: int | None = None
    detached: bool = False
    tag: str | None = None
    created: float = field(default_factory=time.time)
    namespaces: dict[str, str] = field(default_factory=dict)  # node -> ns name
    pids: list[dict[str, Any]] = field(default_factory=list)  # {pid, start, node, what}
    topology: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return state_dir() / f"{self.id}.json"

    # -- persistence --
    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "variant": self.variant,
            "owner": None
            if self.owner_pid is None
            else {"pid": self.owner_pid, "start": self.owner_start},
            "detached": self.detached,
            "tag": self.tag,
            "created": self.created,
            "namespaces": self.namespaces,
            "pids": self.pids,
            "topology": self.topology,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Ledger:
        owner = d.get("owner") or {}
        return cls(
            id=d["id"],
            variant=d.get("variant", ""),
            owner_pid=owner.get("pid"),
            owner_start=owner.get("start"),
            detached=bool(d.get("detached", False)),
            tag=d.get("tag"),
            created=d.get("created", 0.0),
            namespaces=dict(d.get("namespaces", {})),
            pids=list(d.get("pids", [])),
            topology=d.get("topology"),
        )

    def save(self) -> None:
        """Write atomically (temp file in the same directory, then rename)."""
        d = state_dir()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.id}.", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, tb_id: str) -> Ledger:
        """Read a ledger; FileNotFoundError if there is none with that id."""
        path = state_dir() / f"{tb_id}.json"
        return cls.from_json(json.loads(path.read_text()))

    @classmethod
    def create(cls, tb_id: str, **kwargs: Any) -> Ledger:
        """A new ledger owned by this process (unless ``detached``), saved."""
        led = cls(id=tb_id, **kwargs)
        if not led.detached:
            led.owner_pid = os.getpid()
            led.owner_start = proc_start_time(os.getpid())
        with locked():
            led.save()
        return led

    def update(self, change: Callable[[Ledger], None]) -> None:
        """Re-read the file under the lock, apply ``change``, save. Keeps
        concurrent handles of the same testbed (e.g. CLI exec) from losing
        each other's records; the in-memory copy is refreshed too."""
        with locked():
            try:
                fresh = Ledger.load(self.id)
            except FileNotFoundError:
                fresh = self
            change(fresh)
            fresh.save()
            self.__dict__.update(fresh.__dict__)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- state --
    def owner_alive(self) -> bool:
        if self.owner_pid is None:
            return False
        return pid_alive(self.owner_pid, self.owner_start)

    def is_live(self) -> bool:
        """Claimed by someone: a detached testbed or a live owner."""
        return self.detached or self.owner_alive()

    def add_pid(self, pid: int, node: str | None = None, what: str = "") -> None:
        start = proc_start_time(pid)

        def change(led: Ledger) -> None:
            led.pids.append({"pid": pid, "start": start, "node": node, "what": what})

        self.update(change)

    def forget_pid(self, pid: int) -> None:
        def change(led: Ledger) -> None:
            led.pids = [p for p in led.pids if p["pid"] != pid]

        self.update(change)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Exclusive flock on the state directory."""
    fd = os.open(state_dir(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def all_ledgers() -> list[Ledger]:
    out = []
    for p in sorted(state_dir().glob("*.json")):
        try:
            out.append(Ledger.from_json(json.loads(p.read_text())))
        except (OSError, ValueError, KeyError):
            # A corrupt or vanished file; atomic writes make this rare.
            continue
    return out


def teardown(led: Ledger) -> list[str]:
    """Remove everything ``led`` recorded (processes, namespaces, the file)."""
    removed: list[str] = []
    pids = [(int(p["pid"]), p.get("start")) for p in led.pids]
    for pid in kill_pids(pids):
        removed.append(f"process {pid}")
    for ns in led.namespaces.values():
        if delete_namespace(ns):
            removed.append(f"namespace {ns}")
    led.remove()
    removed.append(f"ledger {led.id}")
    return removed


def sweep(*, all_: bool = False) -> list[str]:
    """Remove testbeds whose owner is dead (every testbed with ``all_``):
    their processes, namespaces and ledger files; then stray ``ph-*``
    namespaces that no remaining ledger claims. Returns what was removed."""
    removed: list[str] = []
    # List namespaces *before* reading ledgers: a builder writes its ledger
    # before creating a namespace, so every namespace seen here that belongs to
    # a live testbed is claimed by a ledger read below.
    namespaces = [n for n in list_namespaces() if n.startswith(NS_PREFIX)]
    with locked():
        ledgers = all_ledgers()
        keep: list[Ledger] = []
        dead: list[Ledger] = []
        for led in ledgers:
            (dead if all_ or not led.is_live() else keep).append(led)
        for led in dead:
            # Delete the file first, so a concurrent sweep does not redo it.
            led.remove()
    for led in dead:
        desc = "" if not led.tag else f" ({led.tag})"
        removed.extend(f"{item}{desc}" for item in teardown(led))
    for ns in unclaimed(namespaces, keep):
        if delete_namespace(ns):
            removed.append(f"stray namespace {ns}")
    return removed


def unclaimed(seen_before: list[str], live: list[Ledger]) -> list[str]:
    """The namespaces of ``seen_before`` (listed *before* ``live`` was read)
    that no live ledger claims and that still exist. A namespace that vanished
    meanwhile was torn down by its owner (which removes the ledger after the
    namespace), so it is not counted as stray."""
    claimed = {ns for led in live for ns in led.namespaces.values()}
    still_there = set(list_namespaces())
    return [ns for ns in seen_before if ns not in claimed and ns in still_there]
