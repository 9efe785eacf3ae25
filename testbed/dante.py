"""dante's ``socksify``: a real, third-party SOCKS5 client, for Firewall-client checks.

``socksify`` preloads dante's client library, which sends a program's connect(),
bind() and UDP calls through a SOCKS server as its config routes them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbed.build import Testbed

# A program that binds, listens and accepts one connection, as an active-mode FTP
# client's data socket does: it prints where it is bound and who connected, and
# answers what it reads in capitals.
BIND_AND_ACCEPT = """
import ctypes, signal, socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen(1)
print("bound", *s.getsockname()[:2], flush=True)
signal.alarm(int(float(sys.argv[1])))
# libc's accept(), which dante's library takes over (Python's socket.accept() calls
# accept4(), which it does not); with an address buffer: dante writes to it
address, size = ctypes.create_string_buffer(128), ctypes.c_uint32(128)
fd = ctypes.CDLL(None, use_errno=True).accept(s.fileno(), address, ctypes.byref(size))
if fd < 0:
    raise OSError(ctypes.get_errno(), "accept")
c = socket.socket(fileno=fd)
peer = c.getpeername()
print("peer", *peer[:2], flush=True)
c.sendall(c.recv(100).upper())
c.close()
"""


def available() -> str | None:
    """Why socksify cannot run here, or None."""
    return None if shutil.which("socksify") else "dante-client is not installed (run 'make setup')"


def config(proxy: str, port: int) -> str:
    """A dante client config that sends everything through ``proxy`` with user/password."""
    return (f"route {{\n    from: 0.0.0.0/0 to: 0.0.0.0/0 via: {proxy} port = {port}\n"
            "    command: bind connect udpassociate\n    protocol: tcp udp\n"
            "    proxyprotocol: socks_v5\n    method: username\n}\n")


def bind_and_accept(tb: Testbed, node: str, proxy: str, port: int, user: str, password: str,
                    timeout: float) -> tuple[subprocess.Popen[str], Path]:
    """Start BIND_AND_ACCEPT (IPv4) under socksify in ``node``; returns the process (its
    first line of output says where it is bound) and the config directory to remove."""
    workdir = Path(tempfile.mkdtemp(prefix="pinhole-dante-"))
    (workdir / "socks.conf").write_text(config(proxy, port))
    env = dict(os.environ, SOCKS_CONF=str(workdir / "socks.conf"), SOCKS_USERNAME=user,
               SOCKS_PASSWORD=password)
    proc = tb.popen(node, ["socksify", "python3", "-c", BIND_AND_ACCEPT, str(timeout)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    return proc, workdir
