"""The enforcer's configuration file: the policy plus where and how to enforce it.

A bad file fails with ``ConfigError`` naming the file, the line and the reason.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from enforcer.core.binds import DEFAULT_BIND_PORTS
from enforcer.core.limits import MAXIMUM_COUNT, MAXIMUM_SECONDS, MINIMUM, Limits
from enforcer.core.marks import MAX_WORKERS
from enforcer.core.packet import TCP, UDP
from enforcer.core.policy import KeyPath, Policy, PolicyInvalid, Reader, policy_from_dict
from enforcer.core.redirects import DEFAULT_KERNEL_REDIRECT_PORTS, DEFAULT_USER_REDIRECT_PORTS

DEFAULT_SOCKET = "/run/pinhole/enforcer.sock"
BACKENDS = ("auto", "iptables", "nft")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
INCREASED_RECEIVE_BUFFER = 1 << 20  # INCREASE_RECEIVE_BUFFER's buffer, by default
MIN_INCREASED_RECEIVE_BUFFER = 64 * 1024  # SPEC rule 13


class ConfigError(Exception):
    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class NetworkSettings:
    internal_interfaces: tuple[str, ...]
    external_interfaces: tuple[str, ...]
    nat: bool = False


@dataclass(frozen=True)
class DataplaneSettings:
    queue: int = 0
    fail_open: bool = False
    backend: str = "auto"  # "iptables", "nft", or "auto": nft where the kernel has its queue
    # RedirectConnections' ports on the internal addresses, one range per mode
    kernel_redirect_ports: tuple[int, int] = DEFAULT_KERNEL_REDIRECT_PORTS
    user_redirect_ports: tuple[int, int] = DEFAULT_USER_REDIRECT_PORTS
    # the queue socket's receive buffer in bytes (None: the binding's default)
    receive_buffer: int | None = None
    # what INCREASE_RECEIVE_BUFFER makes a buffer a secondary UDP flow's datagrams wait in
    # at the fw (the queue's; a Firewall client's UDP bind's socket): at least this many
    # bytes. SPEC rule 13 asks 64 KiB, which Linux's default (net.core.rmem_default,
    # 208 KiB) exceeds already: "increased" is more than the default.
    increased_receive_buffer: int = INCREASED_RECEIVE_BUFFER
    # (IP protocol, (low, high)): the fw's own services reachable from outside, lockdown
    # included; the rest of what the fw serves answers only the internal side
    open_ports: tuple[tuple[int, tuple[int, int]], ...] = ()
    # Single-use kernel-mode grants held by the kernel, which admits their flows' first
    # packets itself (false: the enforcer matches every grant)
    kernel_grants: bool = True
    # worker processes that read user-mode flows' packets, worker k from queue ``queue + k``
    # (0: the main process reads them all)
    workers: int = 0


@dataclass(frozen=True)
class SocksSettings:
    """The SOCKS5 service Firewall clients use (RFC 1928, RFC 1929 user/password)."""

    port: int = 1080  # on each internal address
    bind_ports: tuple[int, int] = DEFAULT_BIND_PORTS  # BIND and UDP ASSOCIATE, on external addresses
    require_auth: bool = True
    users: dict[str, str] = field(default_factory=dict)  # user -> password


@dataclass(frozen=True)
class Config:
    policy: Policy
    network: NetworkSettings
    dataplane: DataplaneSettings
    control_socket: str = DEFAULT_SOCKET
    # name -> "module:attribute" of a factory that makes a DataFilter for a flow
    data_filters: dict[str, str] = field(default_factory=dict)
    socks: SocksSettings | None = None  # None: no SOCKS service
    # application filters to use (entry points of the "pinhole.filters" group)
    app_filters: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)


def socket_path_problem(path: str) -> str | None:
    """What is wrong with ``path`` as the control socket's path, or None."""
    if not path:
        return "must not be empty"
    if len(path.encode()) > MAX_SOCKET_PATH:
        return f"a UNIX socket path has at most {MAX_SOCKET_PATH} bytes"
    return None


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # a byte order mark, as some editors write, is no error
    except UnicodeDecodeError as exc:
        raise ConfigError(path, data.count(b"\n", 0, exc.start) + 1,
                          f"not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    return parse(text, path)


def parse(text: str, path: Path | str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ConfigError(path, None, "not valid TOML: nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        reason = str(exc)[: match.start()].strip() if match else str(exc)
        raise ConfigError(path, line, f"not valid TOML: {reason}") from None
    try:
        policy = policy_from_dict(data, extra_sections=("network", "dataplane", "control",
                                                        "data_filters", "socks", "filters",
                                                        "limits"))
        root = Reader(data)
        net = root.table("network")
        net.check_keys({"internal_interfaces", "external_interfaces", "nat"})
        internal = tuple(net.strings("internal_interfaces"))
        external = tuple(net.strings("external_interfaces"))
        if not internal or not external:
            raise net.fail(None, "needs internal_interfaces and external_interfaces")
        if set(internal) & set(external):
            raise net.fail("external_interfaces", "an interface cannot be both internal and external")
        network = NetworkSettings(internal, external, net.get("nat", bool, False))
        dp = root.table("dataplane")
        dp.check_keys({"queue", "fail_open", "backend", "kernel_redirect_ports",
                       "user_redirect_ports", "receive_buffer", "increased_receive_buffer",
                       "open_ports", "kernel_grants", "workers"})
        queue = dp.get("queue", int, 0)
        if not 0 <= queue <= 65535:
            raise dp.fail("queue", "must be a queue number 0-65535")
        backend = dp.get("backend", str, "auto")
        if backend not in BACKENDS:
            raise dp.fail("backend", f"must be one of {', '.join(BACKENDS)}, not '{backend}'")
        kernel_ports = _port_range(dp, "kernel_redirect_ports", DEFAULT_KERNEL_REDIRECT_PORTS)
        user_ports = _port_range(dp, "user_redirect_ports", DEFAULT_USER_REDIRECT_PORTS)
        if kernel_ports[0] <= user_ports[1] and user_ports[0] <= kernel_ports[1]:
            written, other = (("user_redirect_ports", "kernel_redirect_ports")
                              if "user_redirect_ports" in dp.data else
                              ("kernel_redirect_ports", "user_redirect_ports"))
            raise dp.fail(written, f"must not overlap {other}")
        receive_buffer = dp.get("receive_buffer", int, None)
        if receive_buffer is not None and not 4096 <= receive_buffer <= 2**30:
            raise dp.fail("receive_buffer", "must be from 4096 to 1073741824 bytes")
        increased = dp.get("increased_receive_buffer", int, INCREASED_RECEIVE_BUFFER)
        if not MIN_INCREASED_RECEIVE_BUFFER <= increased <= 2**30:
            raise dp.fail("increased_receive_buffer",
                          f"must be from {MIN_INCREASED_RECEIVE_BUFFER} to 1073741824 bytes")
        workers = dp.get("workers", int, 0)
        if not 0 <= workers <= MAX_WORKERS:
            raise dp.fail("workers", f"must be from 0 to {MAX_WORKERS} worker processes")
        if queue + workers > 65535:
            raise dp.fail("workers", f"worker queues {queue + 1}-{queue + workers} go past 65535")
        dataplane = DataplaneSettings(queue, dp.get("fail_open", bool, False), backend,
                                      kernel_ports, user_ports, receive_buffer, increased,
                                      _open_ports(dp), dp.get("kernel_grants", bool, True),
                                      workers)
        control = root.table("control")
        control.check_keys({"socket"})
        socket_path = control.get("socket", str, DEFAULT_SOCKET)
        wrong = socket_path_problem(socket_path)
        if wrong is not None:
            raise control.fail("socket", wrong)
        filters = root.table("data_filters")
        data_filters = {}
        for name in filters.data:
            target = filters.get(name, str)
            module, _, attribute = target.partition(":")
            if not module or not attribute:
                raise filters.fail(name, f"'{target}' is not 'module:attribute'")
            data_filters[name] = target
        socks = _socks(root) if "socks" in data else None
        app = root.table("filters")
        app.check_keys({"enable"})
        app_filters = tuple(app.strings("enable")) if "enable" in app.data else ()
        if len(set(app_filters)) != len(app_filters):
            raise app.fail("enable", "names a filter twice")
        if not all(name.strip() for name in app_filters):
            raise app.fail("enable", "has an empty filter name")
        limits = _limits(root)
    except PolicyInvalid as exc:
        raise ConfigError(path, locate(text, exc.path), str(exc)) from None
    return Config(policy, network, dataplane, socket_path, data_filters, socks, app_filters, limits)


def _limits(root: Reader) -> Limits:
    section = root.table("limits")
    section.check_keys(MINIMUM)
    values = {}
    for key, low in MINIMUM.items():
        default = getattr(Limits, key)
        kind: type | tuple[type, ...] = (int, float) if isinstance(default, float) else int
        value = section.get(key, kind, default)
        if value < low:
            raise section.fail(key, f"must be at least {low}")
        high, unit = ((MAXIMUM_SECONDS, " seconds (a year)") if isinstance(default, float)
                      else (MAXIMUM_COUNT, ""))
        if value > high:
            raise section.fail(key, f"must be at most {high:.0f}{unit}")
        values[key] = type(default)(value)
    return Limits(**values)


def _socks(root: Reader) -> SocksSettings:
    section = root.table("socks")
    section.check_keys({"port", "bind_ports", "require_auth", "users"})
    port = section.get("port", int, 1080)
    if not 1 <= port <= 65535:
        raise section.fail("port", "must be a port 1-65535")
    bind_ports = _port_range(section, "bind_ports", SocksSettings.bind_ports)
    users_table = section.table("users")
    users = {name: users_table.get(name, str) for name in users_table.data}
    for name, password in users.items():
        if not 1 <= len(name.encode()) <= 255 or not 1 <= len(password.encode()) <= 255:
            raise users_table.fail(name, "user names and passwords are 1 to 255 bytes (RFC 1929)")
    require_auth = section.get("require_auth", bool, True)
    if require_auth and not users:
        raise section.fail("users", "require_auth needs at least one user")
    return SocksSettings(port, bind_ports, require_auth, users)


_OPEN_PORT = re.compile(r"^(tcp|udp)/(\d{1,5})(?:-(\d{1,5}))?$")


def _open_ports(reader: Reader) -> tuple[tuple[int, tuple[int, int]], ...]:
    out = []
    for i, text in enumerate(reader.strings("open_ports", [])):
        match = _OPEN_PORT.match(text)
        low = int(match.group(2)) if match else 0
        high = int(match.group(3) or low) if match else 0
        if match is None or not 1 <= low <= high <= 65535:
            raise PolicyInvalid((*reader.path, "open_ports", i),
                                f"'{text}' is not PROTOCOL/PORT or PROTOCOL/LOW-HIGH "
                                "(tcp or udp, ports 1-65535)")
        out.append((TCP if match.group(1) == "tcp" else UDP, (low, high)))
    return tuple(out)


def _port_range(reader: Reader, key: str, default: tuple[int, int]) -> tuple[int, int]:
    value = reader.get(key, list, list(default))
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
            or not 1024 <= value[0] <= value[1] <= 65535:
        raise reader.fail(key, "must be [low, high], ports from 1024 to 65535 with low <= high")
    return value[0], value[1]


def locate(text: str, path: KeyPath) -> int | None:
    """The line a key path refers to, found by walking table headers and keys in order
    (a dotted header such as ``[socks.users]``, or a dotted key such as ``socks.port =``,
    names a path of several keys)."""
    lines = text.splitlines()
    start, found = 0, None
    names: list[str] = []
    pending: list[str] = []  # the keys since the last one found: a dotted key may hold them
    for i, part in enumerate(path):
        if isinstance(part, int):
            continue
        names.append(part)
        pending.append(part)
        following = path[i + 1] if i + 1 < len(path) else None
        index = following if isinstance(following, int) else None  # [[array]] tables only
        hit = _header(lines, ".".join(names), index)
        if hit is None:
            hit = _key(lines, pending, start)
        if hit is not None:
            start, found, pending = hit, hit, []
    if pending:  # the path ends inside a dotted key (``pending.more =``), or was not found
        hit = _key(lines, pending, start, inside=True)
        found = found if hit is None else hit
    return None if found is None else found + 1


def _header(lines: list[str], name: str, index: int | None) -> int | None:
    seen = -1
    pattern = re.compile(rf"^\s*\[\[?\s*{re.escape(name)}\s*\]\]?\s*(#.*)?$")
    for n, line in enumerate(lines):
        if pattern.match(line):
            seen += 1
            if index is None or seen == index:
                return n
    return None


def _key(lines: list[str], names: list[str], start: int, *, inside: bool = False) -> int | None:
    """The first line from ``start`` in its table that sets the key ``names`` (dotted
    when several), or with ``inside`` a key inside it (``names.more =``)."""
    dotted = r"\s*\.\s*".join(re.escape(name) for name in names)
    pattern = re.compile(rf"^\s*{dotted}\s*{'[=.]' if inside else '='}")
    for n in range(start, len(lines)):
        if n > start and lines[n].lstrip().startswith("["):
            return None
        if pattern.match(lines[n]):
            return n
    return None
