"""Real FTP and TFTP peers, run inside testbed namespaces.

Third-party servers and clients that a firewall under test has to carry: vsftpd
and pyftpdlib as FTP servers; curl, lftp and Python's ftplib as FTP clients;
tftpd-hpa's ``in.tftpd`` as the TFTP server; tftp-hpa's ``tftp``, ``atftp`` and
curl as TFTP clients. A clause test starts a server on a server node, runs a
client on a client node and compares hashes::

    with FtpServer(tb, "s1", "vsftpd", tb.topology.address("s1", "ipv4")) as server:
        mark = server.log_mark()
        r = ftp_transfer(tb, "c1", "curl", server.address, "EPSV", "get", BIG_FILE)
        assert r.ok and r.sha256 == server.files[BIG_FILE], r.describe() + server.log()
        assert server.data_commands(since=mark) == ["EPSV"]

What every server serves
    A fresh temporary root holding :data:`BIG_FILE` (random bytes: 1 MiB for
    FTP; 128 KiB for TFTP, whose lock-step 512-byte blocks make 1 MiB take a
    quarter of a second here; ``big_size`` changes it) and
    :data:`SMALL_FILE` (a line of text); ``server.files`` maps each name to its
    SHA-256. Uploads go to :data:`UPLOAD_DIR` (``incoming/``), and
    ``server.uploaded(name)`` hashes what arrived there. Every server
    context removes its directory and stops its processes (the whole process
    group: vsftpd's and in.tftpd's per-session children too) on exit, error
    or not.

FTP login
    Anonymous: user :data:`FTP_USER` ("anonymous"), password
    :data:`FTP_PASSWORD`. Downloads from ``/``, uploads (STOR) only into
    ``/incoming/``, and an upload cannot overwrite an existing file (vsftpd
    refuses it for anonymous users): give each upload a new name.

FTP servers
    Both accept PASV, EPSV, PORT and EPRT and refuse PORT/EPRT to an address
    other than the control connection's peer (vsftpd ``port_promiscuous=NO``,
    pyftpdlib ``permit_foreign_addresses=False``), as a server behind a real
    firewall would. vsftpd's active-mode data connections come *from port 20*
    (``connect_from_port_20=YES``, the classic behaviour); pyftpdlib's come from
    an ephemeral port. vsftpd connects only when the transfer command (RETR,
    STOR) arrives; pyftpdlib connects while answering PORT/EPRT. Passive ports
    are the kernel's ephemeral ones unless ``passive_ports`` is given.
    pyftpdlib's foreign-address check compares the EPRT address with the
    peer's *as text*, and Linux's nf_nat_ftp writes the IPv6 address it puts
    into EPRT uncompressed (``2001:0db8:0002:0000:...``), which RFC 2428 allows:
    the server here compares addresses instead, so NAT66 EPRT works. Each
    server logs every command it receives to ``server.log_path``;
    :meth:`FtpServer.data_commands` reads the PASV/EPSV/PORT/EPRT commands back
    from it, which is how a test proves the mode a client really used.

FTP clients and modes (:func:`ftp_supports`)
    ============  ======  ======  ======  ======
    client/fam    PASV    EPSV    PORT    EPRT
    ============  ======  ======  ======  ======
    curl   IPv4   yes     yes     yes     yes
    lftp   IPv4   yes     yes     yes     no: lftp sends EPRT only for IPv6 data sockets
    ftplib IPv4   yes     yes     yes     yes
    any    IPv6   no      yes     no      yes
    ============  ======  ======  ======  ======

    PASV and PORT carry an IPv4 address (RFC 959), so over IPv6 only the RFC
    2428 commands exist: curl and lftp send EPSV/EPRT over IPv6 whatever they
    are told, and ftplib's PASV/PORT there get nowhere.
    The mode is forced: curl ``--ftp-pasv [--disable-epsv]`` or
    ``--ftp-port - [--disable-eprt]``; lftp ``ftp:passive-mode``,
    ``ftp:prefer-epsv`` and ``ftp:auto-passive-mode no`` (which otherwise
    switches to active mode after a failed passive data connection); ftplib
    through a subclass that sends exactly the requested command. curl, as
    documented, still falls back from EPSV to PASV, or from EPRT to PORT, when
    the server answers the extended command with an error; neither server here
    does, and ``data_commands`` would show it.

TFTP (:class:`TftpServer`, :func:`tftp_transfer`, :func:`tftp_supports`)
    ``in.tftpd --foreground --create --secure`` on ``address`` port 69. As every
    tftpd, it answers each request from a *new* socket on an ephemeral port
    (the transfer ID of RFC 1350), so a firewall has to expect the reply: that
    is what a TFTP helper is for. in.tftpd logs only to syslog (there is none
    in the namespaces); ``server.log()`` has its standard output and error.
    Uploaded files are created world-writable: in.tftpd refuses to write a
    file without global write permission unless ``--permissive``.
    All three clients get and put over IPv4 and IPv6. tftp-hpa exits 0 even
    when a transfer fails, so success is read from its verbose output
    ("Received"/"Sent ... bytes").

Time limits
    Every client gets ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`)
    through its own options, and runs under coreutils ``timeout`` as a hard
    limit :data:`HARD_LIMIT_MARGIN` seconds later: a blocked data channel
    fails in seconds, never hangs (``TransferResult.timed_out``: the hard limit
    struck).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from testbed import dante
from testbed.build import Testbed
from testbed.topology import Family

__all__ = [
    "BIG_FILE",
    "DEFAULT_TIMEOUT",
    "DIRECTIONS",
    "FTP_CLIENTS",
    "FTP_MODES",
    "FTP_PASSWORD",
    "FTP_SERVERS",
    "FTP_USER",
    "SMALL_FILE",
    "TFTP_CLIENTS",
    "UPLOAD_DIR",
    "Direction",
    "FtpClient",
    "FtpMode",
    "FtpServer",
    "FtpServerKind",
    "PeerError",
    "PeerSet",
    "SocksRoute",
    "TftpClient",
    "TftpServer",
    "TransferResult",
    "family_of",
    "ftp_supports",
    "ftp_transfer",
    "tftp_supports",
    "tftp_transfer",
    "tools_missing",
]

FtpServerKind = Literal["vsftpd", "pyftpdlib"]
FtpClient = Literal["curl", "lftp", "ftplib"]
FtpMode = Literal["PASV", "EPSV", "PORT", "EPRT"]
Direction = Literal["get", "put"]
TftpClient = Literal["tftp-hpa", "atftp", "curl"]

FTP_SERVERS: tuple[FtpServerKind, ...] = ("vsftpd", "pyftpdlib")
FTP_CLIENTS: tuple[FtpClient, ...] = ("curl", "lftp", "ftplib")
FTP_MODES: tuple[FtpMode, ...] = ("PASV", "EPSV", "PORT", "EPRT")
DIRECTIONS: tuple[Direction, ...] = ("get", "put")
TFTP_CLIENTS: tuple[TftpClient, ...] = ("tftp-hpa", "atftp", "curl")

FTP_USER = "anonymous"
FTP_PASSWORD = "pinhole@example.org"
UPLOAD_DIR = "incoming"
BIG_FILE = "random.bin"
SMALL_FILE = "hello.txt"
SMALL_TEXT = "pinhole: a file of known content\n"
FTP_BIG_SIZE = 1 << 20
TFTP_BIG_SIZE = 128 << 10
DEFAULT_TIMEOUT = 8.0
START_TIMEOUT = 5.0
STOP_GRACE = 2.0
HARD_LIMIT_MARGIN = 1.5  # coreutils timeout: the client's own limit plus this

# The unprivileged user in.tftpd and vsftpd's sessions before login run as.
UNPRIVILEGED_USER = "nobody"
# The user vsftpd's anonymous sessions run as: vsftpd changes into its home
# directory before anon_root, so it must exist (Debian's vsftpd package creates
# "ftp" with home /srv/ftp).
VSFTPD_ANON_USER = "ftp"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_MODE_COMMANDS = frozenset(FTP_MODES)


class PeerError(RuntimeError):
    """A peer could not be started or used (the message says why, with its log)."""


def family_of(address: str) -> Family:
    """"ipv4" or "ipv6" for a literal address."""
    return "ipv6" if ipaddress.ip_address(address).version == 6 else "ipv4"


def _url_host(address: str) -> str:
    return f"[{address}]" if family_of(address) == "ipv6" else address


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"file name {name!r}: use letters, digits, '.', '_' and '-' only")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


_TOOLS = {
    "vsftpd": "vsftpd",
    "in.tftpd": "tftpd-hpa",
    "curl": "curl",
    "lftp": "lftp",
    "tftp": "tftp-hpa",
    "atftp": "atftp",
    "timeout": "coreutils",
    "ss": "iproute2",
}


def tools_missing() -> list[str]:
    """The Debian packages (and ``pyftpdlib``) this module needs that are missing here."""
    missing = sorted({pkg for tool, pkg in _TOOLS.items()
                      if shutil.which(tool) is None
                      and not (tool == "in.tftpd" and Path("/usr/sbin/in.tftpd").exists())})
    try:
        import pyftpdlib  # noqa: F401
    except ImportError:
        missing.append("pyftpdlib (Python)")
    return missing


# -- results --------------------------------------------------------------------

@dataclass(frozen=True)
class TransferResult:
    """What one client run did.

    - ``ok``: the client's own verdict (exit status; for tftp-hpa, which exits 0
      regardless, its output), not a hash comparison;
    - ``sha256``: the hash of the file that arrived at the client (downloads,
      even a partial one; None if nothing arrived, and for uploads);
    - ``sent_sha256``: for uploads, the hash of what the client sent, to compare
      with the server's ``uploaded(name)``;
    - ``command``: the exact argv run in the node's namespace (with the
      ``timeout`` wrapper); ``stdout``/``stderr``: the client's output;
    - ``returncode``: None if the run had to be abandoned; ``timed_out``: the
      hard time limit ended the client (its own timeouts give its own exit
      status, e.g. curl's 28); ``elapsed``: wall-clock seconds.
    """

    ok: bool
    sha256: str | None
    command: tuple[str, ...]
    stdout: str
    stderr: str
    returncode: int | None
    elapsed: float
    timed_out: bool
    node: str
    client: str
    mode: str | None  # FTP: PASV/EPSV/PORT/EPRT; TFTP: None
    direction: Direction
    name: str
    sent_sha256: str | None = None  # put: the hash of what the client sent

    def describe(self) -> str:
        """A failure message: what ran, where, how it ended, and its output."""
        how = "timed out" if self.timed_out else f"exit {self.returncode}"
        mode = f" {self.mode}" if self.mode else ""
        # an inline script (ftplib's) would drown the message: show its first line
        shown = [a if "\n" not in a else f"<script: {a.strip().splitlines()[0]} ...>"
                 for a in self.command]
        return (f"{self.client}{mode} {self.direction} {self.name} on {self.node}: "
                f"{'ok' if self.ok else 'FAILED'} ({how}, {self.elapsed:.2f} s)\n"
                f"command: {shlex.join(shown)}\n"
                f"stdout: {self.stdout.strip() or '(none)'}\n"
                f"stderr: {self.stderr.strip() or '(none)'}\n")


def _bounded(argv: list[str], timeout: float) -> list[str]:
    """``argv`` under coreutils ``timeout``; the hard limit leaves the client a
    moment to report its own time-out first."""
    return ["timeout", "-k", "1", f"{timeout + HARD_LIMIT_MARGIN:g}", *argv]


def _run_client(tb: Testbed, node: str, bounded: list[str], timeout: float,
                input: str | None = None) -> tuple[subprocess.CompletedProcess[str] | None, float]:
    """Run ``bounded`` (see :func:`_bounded`) in ``node``; None if even that hung."""
    t0 = time.monotonic()
    try:
        r = tb.run(node, bounded, check=False, timeout=timeout + HARD_LIMIT_MARGIN + 5,
                   input=input)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0
    return r, time.monotonic() - t0


# -- servers ----------------------------------------------------------------------

class _Server:
    """A server process in one node, over a fresh directory of known files."""

    port: int
    proto: str  # "tcp" or "udp"
    big_size: int
    # vsftpd writes its start-up errors ("500 OOPS: ...") to descriptor 0, the
    # control connection of its inetd mode: give it the output file there too
    _errors_on_stdin = False

    def __init__(self, tb: Testbed, node: str, address: str) -> None:
        ipaddress.ip_address(address)  # a literal address, or ValueError
        self.tb = tb
        self.node = node
        self.address = address
        self.family: Family = family_of(address)
        self.files: dict[str, str] = {}
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths
    def _dir(self) -> Path:
        if self.workdir is None:
            raise PeerError(f"{self!r} is not running")
        return self.workdir

    @property
    def root(self) -> Path:
        """The served directory (``/`` for clients)."""
        return self._dir() / "root"

    @property
    def upload_dir(self) -> Path:
        return self.root / UPLOAD_DIR

    @property
    def log_path(self) -> Path:
        """The server's own log (for vsftpd and pyftpdlib: every command received)."""
        return self._dir() / "server.log"

    @property
    def output_path(self) -> Path:
        """The server process's standard output and error."""
        return self._dir() / "server.out"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- what clients see
    def uploaded(self, name: str) -> str | None:
        """SHA-256 of ``incoming/name`` on the server, or None if nothing is there."""
        _check_name(name)
        path = self.upload_dir / name
        return _sha256(path) if path.is_file() else None

    def log(self) -> str:
        """The server's log and output, for a failure message."""
        parts = []
        for label, path in (("log", self.log_path), ("output", self.output_path)):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text.strip():
                    parts.append(f"--- {self!r} {label} ({path}) ---\n{text.rstrip()}\n")
        return "".join(parts) or f"--- {self!r}: no log ---\n"

    def log_mark(self) -> int:
        """A position in the log; pass it to ``since=`` to read only what follows."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, mark: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(mark)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- lifecycle
    def _prepare(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"pinhole-{type(self).__name__.lower()}-"))
        self.workdir.chmod(0o755)  # the unprivileged server user must reach root/
        root = self.root
        root.mkdir(mode=0o755)
        (root / BIG_FILE).write_bytes(os.urandom(self.big_size))
        (root / SMALL_FILE).write_text(SMALL_TEXT)
        for name in (BIG_FILE, SMALL_FILE):
            (root / name).chmod(0o644)
            self.files[name] = _sha256(root / name)
        # world-writable: vsftpd's anonymous sessions and in.tftpd write as
        # unprivileged users
        self.upload_dir.mkdir()
        self.upload_dir.chmod(0o1777)

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and return once it listens on ``address``."""
        if self._proc is not None:
            raise PeerError(f"{self!r} already runs")
        try:
            self._prepare()
            argv = self._argv()
            with self.output_path.open("a+b") as out:
                # A session of its own: stop() signals the whole group, so the
                # per-connection children of vsftpd and in.tftpd go too.
                self._proc = self.tb.popen(self.node, argv,
                                           stdin=out if self._errors_on_stdin else subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        flag = "-Hlnt" if self.proto == "tcp" else "-Hlnu"
        want = f"{_url_host(self.address)}:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PeerError(f"{self!r} exited with status {self._proc.returncode} at start\n"
                                + self.log())
            listening = self.tb.run(self.node, ["ss", flag, "sport", "=", f":{self.port}"],
                                    check=False).stdout
            if any(want in line.split() for line in listening.splitlines()):
                return
            if time.monotonic() > deadline:
                raise PeerError(f"{self!r} does not listen on {want} after {START_TIMEOUT:g} s\n"
                                + self.log())
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server's process group and remove its directory. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=STOP_GRACE)
                    # the leader is gone; make sure its children are too
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    break
                except subprocess.TimeoutExpired:
                    continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE)
            self.tb.forget(proc.pid)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node} {_url_host(self.address)}:{self.port}>"


_VSFTPD_COMMAND = re.compile(r'FTP command: Client "[^"]*", "(.*)"$', re.M)
_PYFTPDLIB_COMMAND = re.compile(r"<- (.*)$", re.M)
_VERB = re.compile(r"[A-Za-z]+")

# pyftpdlib in the server node: anonymous read-only root, writable incoming/,
# every command logged (DEBUG), bounded data-channel timeouts.
PYFTPDLIB_SERVER = r"""
import ipaddress, logging, sys, warnings
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

address, root, upload, log, low, high = sys.argv[1:7]
logging.basicConfig(filename=log, level=logging.DEBUG,
                    format="%(asctime)s [%(process)d] %(message)s")
warnings.simplefilter("ignore", RuntimeWarning)  # "write permissions assigned to anonymous"

class Handler(FTPHandler):
    def _make_eport(self, ip, port):
        # pyftpdlib compares the PORT/EPRT address with the peer's as text; Linux's
        # nf_nat_ftp writes IPv6 EPRT addresses uncompressed (2001:0db8:...): compare
        # addresses, not spellings (the foreign-address check itself stays on)
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            pass
        return super()._make_eport(ip, port)

authorizer = DummyAuthorizer()
authorizer.add_anonymous(root, perm="elr")
authorizer.override_perm("anonymous", upload, perm="elrw", recursive=True)
Handler.authorizer = authorizer
Handler.banner = "pinhole pyftpdlib ready"
Handler.timeout = 60
Handler.permit_foreign_addresses = False
if int(low):
    Handler.passive_ports = range(int(low), int(high) + 1)
Handler.passive_dtp.timeout = Handler.active_dtp.timeout = 8
Handler.dtp_handler.timeout = 15
FTPServer((address, 21), Handler).serve_forever()
"""


def _vsftpd_anon_user() -> str:
    try:
        home = pwd.getpwnam(VSFTPD_ANON_USER).pw_dir
    except KeyError:
        raise PeerError(f"vsftpd needs the user {VSFTPD_ANON_USER!r} for anonymous logins "
                        "(Debian's vsftpd package creates it; run 'make setup')") from None
    if not Path(home).is_dir():
        raise PeerError(f"the home directory {home} of {VSFTPD_ANON_USER!r} is missing: vsftpd "
                        "changes into it at every anonymous login")
    return VSFTPD_ANON_USER


class FtpServer(_Server):
    """An FTP server (``kind`` "vsftpd" or "pyftpdlib") in ``node`` on ``address`` port 21.

    One server per address; IPv4 and IPv6 need one each. See the module
    docstring for what it serves and how."""

    port = 21
    proto = "tcp"
    big_size = FTP_BIG_SIZE

    def __init__(self, tb: Testbed, node: str, kind: FtpServerKind, address: str, *,
                 passive_ports: tuple[int, int] | None = None) -> None:
        if kind not in FTP_SERVERS:
            raise ValueError(f"unknown FTP server {kind!r} (choose from {', '.join(FTP_SERVERS)})")
        super().__init__(tb, node, address)
        self.kind: FtpServerKind = kind
        self._errors_on_stdin = kind == "vsftpd"
        self.passive_ports = passive_ports

    def _vsftpd_conf(self) -> str:
        d = self._dir()
        (d / "empty").mkdir(mode=0o755, exist_ok=True)
        v6 = self.family == "ipv6"
        lines = [
            # one process per server that stays in the foreground (a PID to stop);
            # no seccomp sandbox: its syscall filter trips inside namespaces
            "background=NO", "seccomp_sandbox=NO",
            f"listen={'NO' if v6 else 'YES'}", f"listen_ipv6={'YES' if v6 else 'NO'}",
            f"listen_address{'6' if v6 else ''}={self.address}", "listen_port=21",
            "anonymous_enable=YES", "local_enable=NO", "no_anon_password=YES",
            f"anon_root={self.root}", f"ftp_username={_vsftpd_anon_user()}",
            f"nopriv_user={UNPRIVILEGED_USER}", f"secure_chroot_dir={d / 'empty'}",
            "write_enable=YES", "anon_upload_enable=YES", "anon_mkdir_write_enable=NO",
            "anon_other_write_enable=NO", "anon_umask=022",
            "pasv_enable=YES", "port_enable=YES", "pasv_promiscuous=NO", "port_promiscuous=NO",
            "connect_from_port_20=YES", "ftp_data_port=20",
            # sessions stay in the node's namespaces (isolate_network would clone
            # a network namespace per session), so a sweep of the node finds them
            "isolate=NO", "isolate_network=NO",
            "connect_timeout=8", "accept_timeout=8", "data_connection_timeout=15",
            "idle_session_timeout=60",
            "dirmessage_enable=NO", "use_localtime=NO", "syslog_enable=NO",
            "xferlog_enable=YES", "xferlog_std_format=NO", "log_ftp_protocol=YES",
            f"vsftpd_log_file={self.log_path}",
            "ftpd_banner=pinhole vsftpd ready",
        ]
        if self.passive_ports:
            lines += [f"pasv_min_port={self.passive_ports[0]}",
                      f"pasv_max_port={self.passive_ports[1]}"]
        return "\n".join(lines) + "\n"

    def _argv(self) -> list[str]:
        if self.kind == "vsftpd":
            conf = self._dir() / "vsftpd.conf"
            conf.write_text(self._vsftpd_conf())
            return ["vsftpd", str(conf)]
        low, high = self.passive_ports or (0, 0)
        return [sys.executable, "-c", PYFTPDLIB_SERVER, self.address, str(self.root),
                str(self.upload_dir), str(self.log_path), str(low), str(high)]

    def command_lines(self, since: int = 0) -> list[str]:
        """The FTP commands the server logged after ``since`` (see :meth:`log_mark`), whole:
        what the client sent after the firewall's filter had its say."""
        pattern = _VSFTPD_COMMAND if self.kind == "vsftpd" else _PYFTPDLIB_COMMAND
        return [m.group(1) for m in pattern.finditer(self.log_since(since))]

    def commands(self, since: int = 0) -> list[str]:
        """The FTP command verbs the server logged after ``since``."""
        return [m.group(0).upper() for line in self.command_lines(since)
                if (m := _VERB.match(line)) is not None]

    def data_commands(self, since: int = 0) -> list[str]:
        """The PASV/EPSV/PORT/EPRT commands received after ``since``: the modes used."""
        return [c for c in self.commands(since) if c in _MODE_COMMANDS]

    def __repr__(self) -> str:
        return f"<FtpServer {self.kind} {self.node} {_url_host(self.address)}:21>"


class TftpServer(_Server):
    """tftpd-hpa's ``in.tftpd`` in ``node`` on ``address`` port 69, in the foreground,
    chrooted (``--secure``) to its root, creating uploaded files (``--create``)."""

    port = 69
    proto = "udp"

    def __init__(self, tb: Testbed, node: str, address: str, *,
                 big_size: int = TFTP_BIG_SIZE) -> None:
        super().__init__(tb, node, address)
        self.big_size = big_size

    def _argv(self) -> list[str]:
        binary = shutil.which("in.tftpd") or "/usr/sbin/in.tftpd"
        return [binary, "--foreground", "--ipv6" if self.family == "ipv6" else "--ipv4",
                "--address", f"{_url_host(self.address)}:69", "--create", "--secure",
                "--user", UNPRIVILEGED_USER, "--verbose", str(self.root)]


# -- FTP clients --------------------------------------------------------------------

def ftp_supports(client: FtpClient, mode: FtpMode, family: Family) -> bool:
    """Whether ``client`` can do ``mode`` over ``family`` (see the module docstring)."""
    if client not in FTP_CLIENTS or mode not in FTP_MODES or family not in ("ipv4", "ipv6"):
        raise ValueError(f"unknown client, mode or family: {client!r}, {mode!r}, {family!r}")
    if family == "ipv6":
        return mode in ("EPSV", "EPRT")  # RFC 959's PASV and PORT carry IPv4 addresses only
    return not (client == "lftp" and mode == "EPRT")


# ftplib in the client node: exactly the requested data-channel command, in one write
# or in writes of the sizes given (each its own segment: no Nagle, a pause between).
FTPLIB_CLIENT = r"""
import ftplib, socket, sys, time
host, port, copies, mode, direction, remote, local, timeout, user, password = sys.argv[1:11]
pieces = [int(size) for size in sys.argv[11].split(",") if size]

class Client(ftplib.FTP):
    def putline(self, line):
        if not pieces or line.split(" ", 1)[0] != mode:
            return super().putline(line)
        data = (line + ftplib.CRLF).encode(self.encoding)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for size in pieces:
            self.sock.sendall(data[:size])
            data = data[size:]
            time.sleep(0.05)
        self.sock.sendall(data)

    def makepasv(self):
        if mode == "EPSV":
            return ftplib.parse229(self.sendcmd("EPSV"), self.sock.getpeername())
        _untrusted, port = ftplib.parse227(self.sendcmd("PASV"))
        return self.sock.getpeername()[0], port  # as ftplib does: trust only the peer

    def makeport(self):
        sock = socket.create_server(("", 0), family=self.af, backlog=1)
        here, port = self.sock.getsockname()[0], sock.getsockname()[1]
        if mode == "PORT":
            self.sendport(here, port)
        else:
            self.sendeprt(here, port)
        sock.settimeout(self.timeout)
        return sock

ftp = Client(timeout=float(timeout))
ftp.connect(host, int(port))
ftp.login(user, password)
ftp.set_pasv(mode in ("PASV", "EPSV"))
if direction == "get":
    for i in range(int(copies)):
        with open(local if i == 0 else f"{local}.{i + 1}", "wb") as f:
            print(ftp.retrbinary(f"RETR {remote}", f.write))
else:
    with open(local, "rb") as f:
        print(ftp.storbinary(f"STOR {remote}", f))
ftp.quit()
"""


def _copies(local: str, copies: int) -> list[str]:
    """Where the copies of a download go: ``local``, then ``local.2``, ``local.3``..."""
    return [local if i == 0 else f"{local}.{i + 1}" for i in range(copies)]


def _ftp_argv(client: FtpClient, server_address: str, mode: FtpMode, direction: Direction,
              remote: str, local: str, timeout: float, port: int = 21,
              copies: int = 1, pieces: tuple[int, ...] = ()) -> list[str]:
    host = _url_host(server_address) + (f":{port}" if port != 21 else "")
    secs = f"{timeout:g}"
    if client == "curl":
        flags = {"PASV": ["--ftp-pasv", "--disable-epsv"], "EPSV": ["--ftp-pasv"],
                 "PORT": ["--ftp-port", "-", "--disable-eprt"], "EPRT": ["--ftp-port", "-"]}[mode]
        argv = ["curl", "--silent", "--show-error", "--globoff", "--connect-timeout", secs,
                "--max-time", secs, "--user", f"{FTP_USER}:{FTP_PASSWORD}", *flags]
        if direction == "get":  # one connection for every copy: curl reuses it
            return [*argv, *(a for out in _copies(local, copies)
                             for a in ("--output", out, f"ftp://{host}/{remote}"))]
        return [*argv, "--upload-file", local, f"ftp://{host}/{remote}"]
    if client == "lftp":
        passive = mode in ("PASV", "EPSV")
        settings = [
            "set cmd:fail-exit yes", f"set net:timeout {secs}", "set net:max-retries 1",
            "set net:persist-retries 0", "set net:reconnect-interval-base 1",
            "set ftp:ssl-allow no", "set ftp:auto-passive-mode no",
            f"set ftp:passive-mode {'on' if passive else 'off'}",
            f"set ftp:prefer-epsv {'yes' if mode == 'EPSV' else 'no'}",
            "set xfer:clobber yes", "set ftp:use-site-utime no", "set ftp:use-site-utime2 no",
        ]
        transfer = ("; ".join(f"get {remote} -o {out}" for out in _copies(local, copies))
                    if direction == "get" else f"put {local} -o {remote}")
        script = "; ".join([*settings, f"open -u {FTP_USER},{FTP_PASSWORD} ftp://{host}",
                            transfer])
        return ["lftp", "-c", script]
    return [sys.executable, "-c", FTPLIB_CLIENT, server_address, str(port), str(copies), mode,
            direction, remote, local, secs, FTP_USER, FTP_PASSWORD, ",".join(map(str, pieces))]


@dataclass(frozen=True)
class SocksRoute:
    """Run a client under dante's ``socksify``, through this SOCKS5 server and user."""

    proxy: str
    port: int
    user: str
    password: str

    def wrap(self, argv: list[str], workdir: Path) -> list[str]:
        conf = workdir / "socks.conf"
        conf.write_text(dante.config(self.proxy, self.port))
        return ["env", f"SOCKS_CONF={conf}", f"SOCKS_USERNAME={self.user}",
                f"SOCKS_PASSWORD={self.password}", "socksify", *argv]


def ftp_transfer(tb: Testbed, node: str, client: FtpClient, server_address: str, mode: FtpMode,
                 direction: Direction, name: str, timeout: float = DEFAULT_TIMEOUT, *,
                 put_size: int = FTP_BIG_SIZE, port: int = 21, copies: int = 1,
                 socks: SocksRoute | None = None, pieces: tuple[int, ...] = ()) -> TransferResult:
    """Run FTP ``client`` in ``node`` against the server on ``server_address`` in ``mode``.

    ``get`` downloads ``name`` from the server's root into a temporary
    directory (removed again); ``sha256`` is the hash of what arrived. ``put``
    uploads ``put_size`` fresh random bytes as ``incoming/name``;
    ``sent_sha256`` is their hash, to compare with the server's
    ``uploaded(name)``. Anonymous login. Raises ValueError for what
    :func:`ftp_supports` rules out.

    ``port``: the control connection's (a server published on another port);
    ``copies``: download the file this many times over one control connection
    (``sha256`` is then the copies' hash if they are all the same, else None);
    ``socks``: run the client under ``socksify``, a Firewall client; ``pieces`` (ftplib
    only): send the ``mode`` command in writes of these sizes (the rest last), each its
    own segment, as a filter must expect a command to come."""
    _check_name(name)
    family = family_of(server_address)
    if not ftp_supports(client, mode, family):
        raise ValueError(f"{client} cannot do {mode} over {family}")
    if pieces and client != "ftplib":
        raise ValueError(f"only ftplib sends a command in pieces, not {client}")
    remote = name if direction == "get" else f"{UPLOAD_DIR}/{name}"

    def build(local: str) -> tuple[list[str], str | None]:
        argv = _ftp_argv(client, server_address, mode, direction, remote, local, timeout, port,
                         copies, pieces)
        return (argv if socks is None else socks.wrap(argv, Path(local).parent)), None

    return _transfer(tb, node, client, mode, direction, name, timeout, build, put_size,
                     success=None, copies=copies)


# -- TFTP clients ---------------------------------------------------------------------

def tftp_supports(client: TftpClient, direction: Direction, family: Family) -> bool:
    """Whether ``client`` can ``direction`` over ``family``: all three clients get
    and put over IPv4 and IPv6 (tftp-hpa with ``-6``, atftp and curl by address)."""
    if client not in TFTP_CLIENTS or direction not in DIRECTIONS or family not in ("ipv4", "ipv6"):
        raise ValueError(f"unknown client, direction or family: {client!r}, {direction!r}, "
                         f"{family!r}")
    return True


def _tftp_argv(client: TftpClient, server_address: str, direction: Direction, remote: str,
               local: str, timeout: float) -> tuple[list[str], str | None]:
    secs = f"{timeout:g}"
    if client == "tftp-hpa":
        flag = "-6" if family_of(server_address) == "ipv6" else "-4"
        # Commands on standard input: -c cannot set the timeouts. "timeout" is the
        # total per transfer; end it before coreutils' timeout does.
        cmd = f"get {remote} {local}" if direction == "get" else f"put {local} {remote}"
        script = f"rexmt 1\ntimeout {max(1, int(timeout) - 1)}\n{cmd}\nquit\n"
        return ["tftp", flag, "-v", "-m", "octet", server_address], script
    if client == "atftp":
        op = "--get" if direction == "get" else "--put"
        return ["atftp", "--tftp-timeout", "1", op, "--remote-file", remote, "--local-file", local,
                server_address, "69"], None
    url = f"tftp://{_url_host(server_address)}/{remote}"
    argv = ["curl", "--silent", "--show-error", "--connect-timeout", secs, "--max-time", secs]
    if direction == "get":
        return [*argv, "--output", local, url], None
    return [*argv, "--upload-file", local, url], None


def tftp_transfer(tb: Testbed, node: str, client: TftpClient, server_address: str,
                  direction: Direction, name: str, timeout: float = DEFAULT_TIMEOUT, *,
                  put_size: int = TFTP_BIG_SIZE) -> TransferResult:
    """Run TFTP ``client`` in ``node`` against the server on ``server_address``.

    As :func:`ftp_transfer`: ``get`` fetches ``name`` (``sha256`` of what
    arrived), ``put`` sends ``put_size`` random bytes as ``incoming/name``
    (``sent_sha256``). Octet mode, the clients' default block size."""
    _check_name(name)
    family = family_of(server_address)
    if not tftp_supports(client, direction, family):
        raise ValueError(f"{client} cannot {direction} over {family}")
    remote = name if direction == "get" else f"{UPLOAD_DIR}/{name}"

    def build(local: str) -> tuple[list[str], str | None]:
        return _tftp_argv(client, server_address, direction, remote, local, timeout)

    # tftp-hpa exits 0 whatever happened; its verbose output says whether it worked.
    success = None
    if client == "tftp-hpa":
        success = re.compile(r"^(Received|Sent) \d+ bytes", re.MULTILINE)
    return _transfer(tb, node, client, None, direction, name, timeout, build, put_size,
                     success=success)


# -- both -----------------------------------------------------------------------------

def _transfer(tb: Testbed, node: str, client: str, mode: str | None, direction: Direction,
              name: str, timeout: float,
              build: Callable[[str], tuple[list[str], str | None]], put_size: int,
              success: re.Pattern[str] | None, copies: int = 1) -> TransferResult:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: choose get or put")
    workdir = Path(tempfile.mkdtemp(prefix="pinhole-client-"))
    try:
        local = workdir / name
        sent = None
        if direction == "put":
            local.write_bytes(os.urandom(put_size))
            sent = _sha256(local)
        argv, stdin = build(str(local))
        argv = _bounded(argv, timeout)
        r, elapsed = _run_client(tb, node, argv, timeout, input=stdin)
        if r is None:  # coreutils' timeout itself did not return
            return TransferResult(False, None, tuple(argv), "", "", None, elapsed, True, node,
                                  client, mode, direction, name, sent)
        timed_out = r.returncode in (124, 137)
        ok = r.returncode == 0 and (success is None or bool(success.search(r.stdout)))
        got = None
        if direction == "get":
            hashes = {_sha256(Path(c)) if Path(c).is_file() else None
                      for c in _copies(str(local), copies)}
            got = hashes.pop() if len(hashes) == 1 else None
        return TransferResult(ok, got, tuple(argv), r.stdout, r.stderr, r.returncode, elapsed,
                              timed_out, node, client, mode, direction, name, sent)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# Where each server runs: both FTP servers listen on port 21, so on two hosts.
PEER_HOSTS = {"vsftpd": "s1", "pyftpdlib": "s2", "tftpd": "s1"}


class PeerSet:
    """The real servers of one testbed, started on first use (per family and kind) and
    kept until :meth:`close`; a host runs one FTP server at a time (port 21)."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.running: dict[tuple[str, str], FtpServer | TftpServer] = {}

    def _address(self, node: str, family: Family) -> str:
        return self.tb.topology.address(node, family)

    def ftp(self, family: Family, kind: FtpServerKind) -> FtpServer:
        key = (family, kind)
        if key not in self.running:
            self.free(PEER_HOSTS[kind], keep=kind)
            node = PEER_HOSTS[kind]
            self.running[key] = FtpServer(self.tb, node, kind, self._address(node, family)).__enter__()
        server = self.running[key]
        assert isinstance(server, FtpServer)
        return server

    def tftp(self, family: Family) -> TftpServer:
        key = (family, "tftpd")
        if key not in self.running:
            node = PEER_HOSTS["tftpd"]
            self.running[key] = TftpServer(self.tb, node, self._address(node, family)).__enter__()
        server = self.running[key]
        assert isinstance(server, TftpServer)
        return server

    def free(self, node: str, keep: str = "") -> None:
        """Stop the FTP servers on ``node`` (something else wants its port 21)."""
        for key in [k for k in self.running if k[1] not in (keep, "tftpd")
                    and PEER_HOSTS[k[1]] == node]:
            self.running.pop(key).stop()

    def close(self) -> None:
        """Stop every server (before the testbed goes down)."""
        while self.running:
            self.running.popitem()[1].stop()
