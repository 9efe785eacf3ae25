"""A ledger of everything a testbed creates, so nothing outlives its owner.

One JSON file per testbed, ``<state dir>/<id>.json`` (state dir:
``$PINHOLE_STATE_DIR`` or ``/run/pinhole/testbeds``). A namespace or process is
written to the ledger *before* it is created, so a crash at any point leaves a
record that :func:`sweep` can act on. Writes are atomic (temp file + rename)
and every read-modify-write holds an ``flock`` on the state directory.

A file that cannot be read as a ledger (damaged, or another program's) is a
:class:`CorruptLedger`, naming the file and what is wrong: what it recorded is not
known, so only ``pinhole testbed down ID`` (:func:`remove_corrupt`) or a sweep with
``all_=True`` removes it.

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

from testbed.jsontypes import NAME_OR_NULL, typed

DEFAULT_STATE_DIR = "/run/pinhole/testbeds"
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "ph-"


class LedgerError(Exception):
    """The state directory or a ledger in it is not usable (the message says which and why)."""


class CorruptLedger(LedgerError, ValueError):
    """A ledger file that cannot be read as one: damaged, or written by something else.
    What it recorded is not known; ``pinhole testbed down ID`` removes it (remove_corrupt)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"the ledger {path} is corrupt ({why})")
        self.path = path
        self.id = path.stem


def state_dir() -> Path:
    """The directory holding ledgers (created if missing)."""
    d = Path(os.environ.get("PINHOLE_STATE_DIR") or DEFAULT_STATE_DIR)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LedgerError(f"the testbeds' state directory {d} (PINHOLE_STATE_DIR, else "
                          f"{DEFAULT_STATE_DIR}) cannot be one: a file is in its place or on "
                          "its path") from None
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

# the types of what to_json writes beside the id (from_json takes a missing one as its default)
FIELDS: dict[str, type | tuple[type, ...]] = {
    "variant": str, "owner": (dict, type(None)), "detached": bool, "tag": NAME_OR_NULL,
    "created": (int, float), "namespaces": dict, "pids": list, "topology": (dict, type(None))}


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
    def from_json(cls, d: Any) -> Ledger:
        """The ledger ``d`` (to_json's) records; a ValueError naming the first field that
        is not what to_json writes (teardown and sweep act on these values)."""
        typed("the file", d, dict)
        typed("id", d.get("id"), str)
        for key, kind in FIELDS.items():
            if key in d:
                typed(key, d[key], kind)
        owner = d.get("owner") or {}
        typed("owner.pid", owner.get("pid"), (int, type(None)))
        typed("owner.start", owner.get("start"), (int, type(None)))
        for node, ns in d.get("namespaces", {}).items():
            typed(f"namespaces.{node}", ns, str)
        for i, p in enumerate(d.get("pids", [])):
            typed(f"pids[{i}]", p, dict)
            typed(f"pids[{i}].pid", p.get("pid"), int)
            typed(f"pids[{i}].start", p.get("start"), (int, type(None)))
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
        """Read a ledger; FileNotFoundError if there is none with that id, CorruptLedger if
        its file is not one."""
        return cls.read(state_dir() / f"{tb_id}.json")

    @classmethod
    def read(cls, path: Path) -> Ledger:
        """The ledger in ``path``; FileNotFoundError if it is gone, CorruptLedger if it
        cannot be read as one (the id it records must be its file's: it is what is removed)."""
        try:
            led = cls.from_json(json.loads(path.read_text()))
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as exc:
            raise CorruptLedger(path, f"cannot read it: {exc.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptLedger(path, f"not JSON: {exc}") from None
        except RecursionError:
            raise CorruptLedger(path, "nested too deeply to read") from None
        except ValueError as exc:
            raise CorruptLedger(path, str(exc)) from None
        if led.id != path.stem:
            raise CorruptLedger(path, f"it records the id {led.id!r}")
        return led

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


def ledgers() -> list[Ledger | CorruptLedger]:
    """Every ledger of the state directory, in the order of their files; for a file that
    cannot be read as one, its CorruptLedger (a vanished one is left out)."""
    out: list[Ledger | CorruptLedger] = []
    for p in sorted(state_dir().glob("*.json")):
        try:
            out.append(Ledger.read(p))
        except FileNotFoundError:
            continue  # (torn down meanwhile)
        except CorruptLedger as exc:
            out.append(exc)
    return out


def all_ledgers() -> list[Ledger]:
    """The ledgers that can be read (ledgers() has the corrupt ones too)."""
    return [led for led in ledgers() if isinstance(led, Ledger)]


def remove_corrupt(bad: CorruptLedger) -> list[str]:
    """Remove a corrupt ledger, and the namespaces named for its testbed that no other
    ledger claims (the processes in them with them: delete_namespace); what else it
    recorded is not known. Returns what was removed."""
    prefix = f"{NS_PREFIX}{bad.id}-"
    namespaces = [n for n in list_namespaces() if n.startswith(prefix)]
    with locked():
        bad.path.unlink(missing_ok=True)
        others = all_ledgers()
    removed = [f"namespace {ns}" for ns in unclaimed(namespaces, others) if delete_namespace(ns)]
    return [*removed, f"corrupt ledger {bad.path}"]


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
    """Remove testbeds whose owner is dead (every testbed with ``all_``, and
    the ledgers that are corrupt): their processes, namespaces and ledger files;
    then stray ``ph-*`` namespaces that no remaining ledger claims. Returns what
    was removed."""
    removed: list[str] = []
    # List namespaces *before* reading ledgers: a builder writes its ledger
    # before creating a namespace, so every namespace seen here that belongs to
    # a live testbed is claimed by a ledger read below.
    namespaces = [n for n in list_namespaces() if n.startswith(NS_PREFIX)]
    with locked():
        keep: list[Ledger] = []
        dead: list[Ledger] = []
        for led in ledgers():
            if isinstance(led, CorruptLedger):
                # whose it is cannot be told: only a sweep of everyone's removes it (its
                # namespaces go as strays, below)
                if all_:
                    led.path.unlink(missing_ok=True)
                    removed.append(f"corrupt ledger {led.path}")
                continue
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
