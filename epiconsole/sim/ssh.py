"""The simulated lab's SSH machines: one asyncssh server on 127.0.0.1 per host (``dgx``, ``pi0``...).

Each lab generates its own ed25519 host key per machine and writes them to ``<dir>/known_hosts`` as
``[127.0.0.1]:PORT ssh-ed25519 ...``, and one client key pair (``<dir>/id_ed25519``, mode 600) that is
the only accepted credential: public-key authentication only, no passwords. So the real drivers connect
with host-key checking on, exactly as they do to the real lab.

Commands are interpreted by :mod:`epiconsole.sim.shell`. Closing a channel (or a signal request)
cancels what the session runs in the foreground; with a pty the hang-up also ends its background jobs
that were not started with ``setsid``/``nohup``. A node in ``lab.faults.node_down`` refuses new
connections and its open connections are dropped, like an unreachable host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from epiconsole.sim.shell import CallbackSink, Io, Machine, QueueSource, Shell
from epiconsole.sim.state import SimLab

HOST = "127.0.0.1"
#: How often open connections are checked against the node_down fault.
FAULT_POLL_S = 0.1


class _Session(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """One exec channel: runs the command through the machine's shell."""

    def __init__(self, sim: SimSSH, machine: Machine) -> None:
        self.sim, self.machine = sim, machine
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.command: str | None = None
        self.pty = False
        self.stdin = QueueSource()
        self.task: asyncio.Task[None] | None = None
        self.shell: Shell | None = None
        self.signal: str | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        self.pty = self.sim.permit_tty
        return self.pty

    def shell_requested(self) -> bool:
        return False  # no interactive shells on the simulated machines

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def session_started(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"sim-ssh-{self.machine.name}")
        self.sim._tasks.add(self.task)
        self.task.add_done_callback(self.sim._tasks.discard)

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.stdin.queue.put_nowait(data)

    def eof_received(self) -> bool:
        self.stdin.queue.put_nowait(None)
        return True  # keep the channel open for the command's output

    def signal_received(self, signal: str) -> None:
        self.signal = signal
        if self.task is not None:
            self.task.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.pty and self.shell is not None:
            self.shell.hangup()

    async def _run(self) -> None:
        chan = self.chan
        assert chan is not None and self.command is not None
        self.shell = Shell(self.machine, self.sim.home)
        out = CallbackSink(chan.write, crlf=self.pty)

        def write_err(data: bytes) -> None:
            chan.write_stderr(data)

        # A pty has one stream: stderr goes where stdout goes, as on a real terminal.
        err = out if self.pty else CallbackSink(write_err)
        io = Io(self.stdin, out, err)
        login = self.shell.login_process(self.command)
        try:
            status = await self.shell.run_script(self.command, io)
        except asyncio.CancelledError:
            signame = self.signal
            if login is not None and login.killed_by is not None:
                signame = signal.Signals(login.killed_by).name
            if signame is not None and not chan.is_closing():
                with contextlib.suppress(Exception):
                    chan.exit_with_signal(signame.upper().removeprefix("SIG"))
                return
            raise
        except Exception as exc:  # a bug in a handler: show it like a crashed program would, never hang
            with contextlib.suppress(Exception):
                chan.write_stderr(f"sh: 1: internal error: {type(exc).__name__}: {exc}\n".encode())
                chan.exit(70)
            raise
        finally:
            if login is not None:
                self.machine.procs.pop(login.pid, None)
        with contextlib.suppress(Exception):
            chan.exit(status & 0xFF)


class _Server(asyncssh.SSHServer):
    def __init__(self, sim: SimSSH, machine: Machine) -> None:
        self.sim, self.machine = sim, machine
        self.conn: asyncssh.SSHServerConnection | None = None

    def _down(self) -> bool:
        name = self.machine.name
        return name in self.sim.lab.nodes and not self.sim.lab.is_up(name)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        if self._down():
            conn.abort()
            return
        self.sim._conns.setdefault(self.machine.name, set()).add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.sim._conns.get(self.machine.name, set()).discard(self.conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def session_requested(self) -> Any:
        if self._down():
            if self.conn is not None:
                self.conn.abort()
            return False
        return _Session(self.sim, self.machine)


class SimSSH:
    """The simulated DGX and Pis as SSH servers. ``ports = await sim.start()``; ``await sim.stop()``."""

    def __init__(self, lab: SimLab, dir: Path, *, api_factory: Callable[[SimLab], Any] | None = None) -> None:
        self.lab = lab
        self.dir = Path(dir)
        self.known_hosts = self.dir / "known_hosts"
        self.client_key = self.dir / "id_ed25519"
        #: Working directory of new sessions (like a login's home directory).
        self.home = self.dir
        names = ["dgx", *lab.nodes]
        self.machines = {
            name: Machine(name, lab, self.dir / "machines", kind="dgx" if name == "dgx" else "pi",
                          api_factory=api_factory)
            for name in names
        }
        #: Like sshd's PermitTTY: off, pty requests are refused (the drivers fall back to plain sessions).
        self.permit_tty = True
        self.ports: dict[str, int] = {}
        self.host_keys: dict[str, asyncssh.SSHKey] = {}
        self._servers: list[asyncssh.SSHAcceptor] = []
        self._conns: dict[str, set[asyncssh.SSHServerConnection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> dict[str, int]:
        """Generate keys, listen on OS-chosen ports, write known_hosts and the client key; name -> port."""
        self.dir.mkdir(parents=True, exist_ok=True)
        client = asyncssh.generate_private_key("ssh-ed25519", comment="epiconsole-sim-client")
        _write_private(self.client_key, client.export_private_key())
        self.client_key.with_suffix(".pub").write_bytes(client.export_public_key())
        authorized = asyncssh.import_authorized_keys(client.export_public_key().decode())
        lines = []
        try:
            for name, machine in self.machines.items():
                key = asyncssh.generate_private_key("ssh-ed25519", comment=f"sim-{name}")
                self.host_keys[name] = key
                server = await asyncssh.create_server(
                    lambda m=machine: _Server(self, m),
                    HOST,
                    0,
                    server_host_keys=[key],
                    authorized_client_keys=authorized,
                    encoding=None,
                    allow_pty=True,
                    agent_forwarding=False,
                    x11_forwarding=False,
                    # The lab's client key is the only credential: no Kerberos (where gssapi is installed),
                    # no host-based or certificate logins.
                    gss_host=None,
                    known_client_hosts=None,
                    x509_trusted_certs=None,
                )
                self._servers.append(server)
                port = server.get_port()
                self.ports[name] = port
                public = key.export_public_key().decode().split()
                lines.append(f"[{HOST}]:{port} {public[0]} {public[1]}")
        except BaseException:
            await self.stop()
            raise
        self.known_hosts.write_text("\n".join(lines) + "\n")
        self._watch = asyncio.create_task(self._watch_faults(), name="sim-ssh-faults")
        return dict(self.ports)

    async def _watch_faults(self) -> None:
        """Drop the open connections of a node that went down (new ones are refused at connect)."""
        while True:
            for name in self.lab.faults.node_down:
                for conn in list(self._conns.get(name, ())):
                    conn.abort()
            await asyncio.sleep(FAULT_POLL_S)

    def running(self, name: str) -> list[str]:
        """Command lines of the processes alive on a machine (for tests and ``epiconsole sim``)."""
        return [p.cmdline for p in self.machines[name].running()]

    async def stop(self) -> None:
        """Close the servers and connections, and kill everything the machines started."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
            self._watch = None
        for server in self._servers:
            server.close()
        for conns in self._conns.values():
            for conn in list(conns):
                conn.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10.0)
        for machine in self.machines.values():
            await machine.shutdown()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)
        self._servers.clear()


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only.

    The key goes into a new file created 600 next to ``path`` and is then renamed over it: an existing
    file with looser permissions never holds the new key, and a symlink planted at ``path`` is replaced,
    not followed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


__all__ = ["HOST", "SimSSH"]
