"""Shared SSH plumbing for the cluster and surgeon drivers: one pooled asyncssh connection per host.

Design
    * A host is a plain :class:`SshTarget` (address, port, user, key, known_hosts, timeouts); the
      drivers never read the lab config themselves.
    * :class:`SshPool` keeps one connection per host (keepalive on, reconnect on demand) and limits the
      sessions open on it at once with an ``asyncio.Semaphore`` (OpenSSH's ``MaxSessions`` is 10). The
      wait for a free session counts against a command's timeout. A refused channel or terminal is the
      host's answer on a live connection, which is kept (with the commands running over it); a link that
      drops under a running command raises :class:`HostUnreachable`, never a result without a status.
    * Host keys are always checked against the target's known_hosts file. An unknown host and a changed
      key are refused with a sentence that says how to fix it. Only public keys and the agent are used;
      password and keyboard-interactive authentication are switched off, and a passphrase-protected key
      file is refused with a pointer to ``ssh-add`` (no passphrase is ever read from the config).
    * Commands reach the remote login shell as one string. Templates are filled by :func:`drivers.templates.fill`, which
      shell-quotes every value (the lab config uses the same function), so ``x; rm -rf ~`` arrives
      as one literal argument.

Killing what we started
    :meth:`SshPool.run` is for short commands and runs without a pseudo-terminal, so stdout and stderr
    stay apart and ``sudo`` fails fast instead of prompting. :meth:`SshPool.stream` is for long commands:
    it requests a pseudo-terminal, so closing the channel hangs up the terminal and the kernel sends
    SIGHUP to the remote shell and its foreground process group (nothing is left behind). With a pty the
    remote side merges stderr into stdout. On a timeout or cancel both also send a KILL signal request,
    which OpenSSH (7.8+) applies to the session's process group for non-root logins, then close. A host
    that cannot give a terminal (``PermitTTY no``, an sshd not running as root) is remembered and gets
    plain sessions, where the signal request does the killing. A ``run()`` cut short on a host that
    honours neither (a root login) leaves its command running: use ``stream()`` for anything long.

Errors a user can cause (unreachable host, refused key, unknown or changed host key, timeout) raise a
subclass of :class:`SshError` whose message is one sentence ending in what to do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

#: Lines of stderr kept for error reports.
STDERR_TAIL = 20


# --------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class SshTarget:
    """How to reach one host. ``key`` empty means the SSH agent and the default key files."""

    name: str
    address: str
    port: int = 22
    user: str = "pi"
    key: str = ""
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 120.0
    keepalive_s: float = 15.0

    @property
    def where(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"

    def known_hosts_path(self) -> Path:
        return Path(self.known_hosts).expanduser()


@dataclass(frozen=True)
class CommandResult:
    """What a finished remote command left: exit status (None when killed by a signal) and its output."""

    command: str
    exit_status: int | None
    stdout: str
    stderr: str
    exit_signal: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def stderr_tail(self, lines: int = STDERR_TAIL) -> str:
        return "\n".join(self.stderr.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------
# Errors


class SshError(Exception):
    """A host could not be used; the message is one sentence that says what to do."""

    kind = "ssh"

    def __init__(self, host: str, message: str) -> None:
        super().__init__(message)
        self.host = host


class HostUnreachable(SshError):
    kind = "unreachable"


class AuthRefused(SshError):
    kind = "auth"


class HostKeyUnknown(SshError):
    kind = "hostkey-unknown"


class HostKeyMismatch(SshError):
    kind = "hostkey-mismatch"


class SshTimeout(SshError):
    kind = "timeout"


class CommandFailed(SshError):
    """A remote command exited non-zero (or was killed); carries the result for its stderr tail."""

    kind = "command"

    def __init__(self, host: str, result: CommandResult, what: str = "") -> None:
        status = f"signal {result.exit_signal}" if result.exit_status is None else f"status {result.exit_status}"
        tail = result.stderr_tail(3).replace("\n", " | ") or result.stdout.strip()[-200:]
        what = what or f"`{_short(result.command)}`"
        super().__init__(host, f"{what} failed on {host} with {status}: {tail or 'no output'}; check the command "
                               f"template and the host.")
        self.result = result


def _short(command: str, n: int = 80) -> str:
    return command if len(command) <= n else command[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Host keys


def _known_keys(target: SshTarget) -> list[asyncssh.SSHKey]:
    """Keys the known_hosts file lists for the target (empty when the file or the entry is missing)."""
    path = target.known_hosts_path()
    try:
        known = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError):
        return []
    trusted = asyncssh.match_known_hosts(known, target.address, target.address, target.port)
    return list(trusted[0])


def _keyscan_hint(target: SshTarget) -> str:
    port = f"-p {target.port} " if target.port != 22 else ""
    return f"ssh-keyscan {port}{target.address} >> {target.known_hosts}"


def _host_key_error(target: SshTarget) -> SshError:
    name = target.name
    if _known_keys(target):
        entry = f"[{target.address}]:{target.port}" if target.port != 22 else target.address
        return HostKeyMismatch(
            name,
            f"the host key of {name} ({target.address}:{target.port}) does not match {target.known_hosts}, so the "
            f"connection was refused; if the host was reinstalled, check its new fingerprint on its console, then "
            f"run `ssh-keygen -R '{entry}' -f {target.known_hosts}` and `{_keyscan_hint(target)}`.",
        )
    return HostKeyUnknown(
        name,
        f"{name} ({target.address}:{target.port}) is not in {target.known_hosts}, so its host key cannot be "
        f"checked; verify its fingerprint on its console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
        f"then add it with `{_keyscan_hint(target)}`.",
    )


# --------------------------------------------------------------------------------------------------
# Connections


def _connect_error(target: SshTarget, exc: BaseException) -> SshError:
    """Turn what asyncssh or the OS raised while connecting into a sentence that says what to do."""
    name, where = target.name, f"{target.address}:{target.port}"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return _host_key_error(target)
    if isinstance(exc, asyncssh.PermissionDenied):
        key = target.key or "your default key / agent"
        return AuthRefused(
            name,
            f"{target.user}@{where} ({name}) refused our key ({key}); install its public key on the host with "
            f"`ssh-copy-id -i {target.key or '~/.ssh/id_ed25519'} -p {target.port} {target.user}@{target.address}` "
            f"or fix hosts.{name}.user/key in the lab config.",
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return SshTimeout(
            name,
            f"{name} ({where}) did not answer within {target.connect_timeout_s:g} s; check that it is powered on "
            f"and on the network, or raise hosts.{name}.connect_timeout_s.",
        )
    if isinstance(exc, asyncssh.KeyImportError) and "assphrase" in str(exc):
        # Config files never hold passphrases: an encrypted key is the agent's job.
        return AuthRefused(name, f"the key file {target.key} for {name} is protected by a passphrase; load it with "
                                 f"`ssh-add {target.key}` and leave hosts.{name}.key empty so the agent is used.")
    if isinstance(exc, asyncssh.KeyImportError) or (isinstance(exc, OSError) and target.key and
                                                     not Path(target.key).expanduser().is_file()):
        return AuthRefused(name, f"the key file {target.key} for {name} cannot be read ({exc}); fix hosts.{name}.key "
                                 f"in the lab config.")
    if isinstance(exc, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(exc, socket.gaierror):
        reason = f"host name not found: {exc.strerror}"
    else:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return HostUnreachable(
        name,
        f"cannot reach {name} at {where} ({reason}); check that it is powered on and that hosts.{name}.address "
        f"and port in the lab config are right.",
    )


class _PtyRefused(Exception):
    """The host refused a pseudo-terminal on a live connection (``PermitTTY no``)."""


def _lost_error(target: SshTarget, command: str) -> SshError:
    """A session that ended with neither an exit status nor a signal: the connection went away under it."""
    return HostUnreachable(
        target.name,
        f"the connection to {target.name} ({target.address}:{target.port}) was lost while `{_short(command)}` ran; "
        f"check that it is powered on and on the network, then retry.",
    )


class _Client(asyncssh.SSHClient):
    """Tells the pool when a connection dies so the next command reconnects."""

    def __init__(self, on_lost: Any) -> None:
        self._on_lost = on_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class SshPool:
    """One pooled connection per host, a session limit per host, and the commands that run over them."""

    def __init__(self, targets: Mapping[str, SshTarget], *, max_sessions: int = 4) -> None:
        self.targets = dict(targets)
        self._conns: dict[str, asyncssh.SSHClientConnection] = {}
        self._locks = {name: asyncio.Lock() for name in self.targets}
        self._sessions = {name: asyncio.Semaphore(max_sessions) for name in self.targets}
        #: Hosts that cannot give a pseudo-terminal (see :meth:`_process`).
        self._no_pty: set[str] = set()
        self._closed = False

    def target(self, name: str) -> SshTarget:
        try:
            return self.targets[name]
        except KeyError:
            raise KeyError(f"no SSH host named {name!r} (known: {', '.join(self.targets)})") from None

    async def connection(self, name: str) -> asyncssh.SSHClientConnection:
        """The pooled connection to ``name``, opened (with host-key check) if needed."""
        if self._closed:
            raise RuntimeError("the SSH pool is closed")
        target = self.target(name)
        async with self._locks[name]:
            conn = self._conns.get(name)
            if conn is not None and not conn.is_closed():
                return conn
            conn = await self._open(target)
            self._conns[name] = conn
            return conn

    async def _open(self, target: SshTarget) -> asyncssh.SSHClientConnection:
        known_hosts = target.known_hosts_path()
        if not known_hosts.is_file():
            raise _host_key_error(target)
        keys = [str(Path(target.key).expanduser())] if target.key else ()
        name = target.name

        def lost() -> None:
            if self._conns.get(name) is conn_box[0]:
                self._conns.pop(name, None)

        conn_box: list[Any] = [None]
        try:
            conn, _ = await asyncio.wait_for(
                asyncssh.create_connection(
                    lambda: _Client(lost),
                    target.address,
                    target.port,
                    username=target.user,
                    known_hosts=str(known_hosts),
                    # Keys or the agent only: never a password, never a prompt.
                    client_keys=keys or (),
                    agent_path=None if keys else (),
                    password=None,
                    password_auth=False,
                    kbdint_auth=False,
                    keepalive_interval=target.keepalive_s,
                    keepalive_count_max=3,
                ),
                # Our own deadline (not asyncssh's) so a silent host reads as a timeout, not a lost link.
                target.connect_timeout_s,
            )
        except (OSError, asyncssh.Error, asyncssh.KeyImportError, TimeoutError) as exc:
            raise _connect_error(target, exc) from None
        conn_box[0] = conn
        return conn

    async def _session(self, name: str, command: str, pty: bool) -> asyncssh.SSHClientProcess[str]:
        """Open a session running ``command``; one reconnect when the pooled connection died under us.

        A refused channel or terminal on a live connection is the host's answer, not a dead link: the
        connection (and every other command running over it) is kept.
        """
        for attempt in (0, 1):
            conn = await self.connection(name)
            try:
                kwargs: dict[str, Any] = {"term_type": "dumb", "term_size": (200, 50)} if pty else {}
                return await conn.create_process(command, encoding="utf-8", errors="replace", **kwargs)
            except asyncssh.ChannelOpenError as exc:
                if pty and exc.code == asyncssh.OPEN_REQUEST_PTY_FAILED and not conn.is_closed():
                    raise _PtyRefused from None
                if not conn.is_closed() and exc.code != asyncssh.OPEN_CONNECT_FAILED:
                    raise SshError(name, f"{name} refused to open a session for `{_short(command)}` ({exc.reason}); "
                                         f"run fewer commands on it at once or raise MaxSessions in its "
                                         f"sshd_config.") from None
                self._drop(name, conn)
                if attempt:
                    raise _connect_error(self.target(name), exc) from None
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, OSError) as exc:
                self._drop(name, conn)
                if attempt:
                    raise _connect_error(self.target(name), exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _drop(self, name: str, conn: asyncssh.SSHClientConnection) -> None:
        if self._conns.get(name) is conn:
            self._conns.pop(name, None)
        conn.close()

    async def _process(self, name: str, command: str, pty: bool) -> tuple[asyncssh.SSHClientProcess[str], bool]:
        """A session, with a pty when asked and the server gives one; returns (process, pty used).

        Some servers cannot give a terminal (``PermitTTY no``; an sshd not running as root drops the
        connection when it cannot chown the pty). Such a host is remembered and gets plain sessions,
        where a cancel relies on the KILL signal request instead of the hang-up.
        """
        if pty and name not in self._no_pty:
            try:
                return await self._session(name, command, True), True
            except (_PtyRefused, HostUnreachable):
                proc = await self._session(name, command, False)
                self._no_pty.add(name)
                return proc, False
        return await self._session(name, command, False), False

    async def run(self, name: str, command: str, *, timeout: float | None = None, check: bool = False,
                  pty: bool = False) -> CommandResult:
        """Run a short command to completion; raise :class:`SshTimeout` (after killing it) past ``timeout``."""
        target = self.target(name)
        limit = target.command_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        start = loop.time()
        sessions = self._sessions[name]
        try:
            # Waiting for a free session counts against the command's time: long streams holding every
            # session must not hang a health check forever.
            await asyncio.wait_for(sessions.acquire(), limit)
        except TimeoutError:
            raise SshTimeout(
                name, f"`{_short(command)}` found no free session on {name} within {limit:g} s (all are busy with "
                      f"long commands); wait for them or cancel one."
            ) from None
        # Connecting has its own limit (connect_timeout_s); the command gets what the queue left of its own.
        remaining = max(0.0, limit - (loop.time() - start))
        try:
            proc, _ = await self._process(name, command, pty)
            try:
                done = await asyncio.wait_for(proc.wait(check=False), remaining)
            except TimeoutError:
                await _kill(proc)
                raise SshTimeout(
                    name, f"`{_short(command)}` on {name} did not finish within {limit:g} s and was stopped; "
                          f"check the host or raise hosts.{name}.command_timeout_s."
                ) from None
            except asyncio.CancelledError:
                await _kill(proc)
                raise
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError) as exc:
                raise _connect_error(target, exc) from None
        finally:
            sessions.release()
        if done.exit_status is None and done.exit_signal is None:
            raise _lost_error(target, command)
        stdout = _text(done.stdout)
        result = CommandResult(command, done.exit_status if done.exit_signal is None else None, stdout,
                               _text(done.stderr), done.exit_signal[0] if done.exit_signal else None)
        if check and not result.ok:
            raise CommandFailed(name, result)
        return result

    def stream(self, name: str, command: str, *, timeout: float | None = None, pty: bool = True) -> RemoteStream:
        """A long command whose output lines arrive as they are printed; see :class:`RemoteStream`."""
        self.target(name)
        return RemoteStream(self, name, command, timeout=timeout, pty=pty)

    async def close(self) -> None:
        """Close every pooled connection (idempotent)."""
        self._closed = True
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5.0)


def _text(data: Any) -> str:
    if data is None:
        return ""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


async def _kill(proc: asyncssh.SSHClientProcess[Any]) -> None:
    """Stop a remote command: KILL signal request (process group, where sshd honours it), then hang up."""
    with contextlib.suppress(Exception):
        proc.send_signal("KILL")
    proc.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait_closed(), 5.0)


# --------------------------------------------------------------------------------------------------
# Streams


class RemoteStream:
    """A running remote command: ``async for line in stream`` yields its output lines (no newline).

    Use it as ``async with pool.stream(...) as s`` or call :meth:`cancel` (idempotent), which kills the
    remote process. After the iteration ends, ``exit_status`` / ``exit_signal`` hold how it ended and
    ``stderr_tail`` its last stderr lines (with a pty, stderr arrives merged into the lines). Past
    ``timeout`` seconds the command is killed and iteration raises :class:`SshTimeout`.
    """

    def __init__(self, pool: SshPool, name: str, command: str, *, timeout: float | None, pty: bool) -> None:
        self.pool, self.name, self.command = pool, name, command
        self.timeout, self.pty = timeout, pty
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._proc: asyncssh.SSHClientProcess[str] | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._deadline: float | None = None
        self._held = False
        self._finished = False

    @property
    def stderr_tail(self) -> tuple[str, ...]:
        return tuple(self._stderr)

    @property
    def finished(self) -> bool:
        return self._finished

    async def start(self) -> RemoteStream:
        """Open the session (done by the first iteration step when not called)."""
        if self._proc is not None or self._finished:
            return self
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(self.pool._sessions[self.name].acquire(), self.timeout)
        except TimeoutError:
            self._finished = True
            raise SshTimeout(self.name, f"`{_short(self.command)}` found no free session on {self.name} within "
                                        f"{self.timeout:g} s (all are busy with long commands); wait for them or "
                                        f"cancel one.") from None
        self._held = True
        queued = loop.time() - start
        try:
            self._proc, self.pty = await self.pool._process(self.name, self.command, self.pty)
        except BaseException:
            self._release()
            raise
        # As in SshPool.run: the wait for a free session comes out of the timeout, connecting does not.
        self._deadline = None if self.timeout is None else loop.time() + max(0.0, self.timeout - queued)
        if not self.pty:
            self._stderr_task = asyncio.create_task(self._read_stderr(), name=f"ssh-stderr-{self.name}")
        return self

    async def _read_stderr(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(Exception):
            async for line in self._proc.stderr:
                if line:  # a closed channel can end the iteration with an empty read
                    self._stderr.append(line.rstrip("\r\n"))

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.pool._sessions[self.name].release()

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> str:
        if self._finished:
            raise StopAsyncIteration
        if self._proc is None:
            await self.start()
        assert self._proc is not None
        remaining = None
        if self._deadline is not None:
            remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            line = await asyncio.wait_for(self._proc.stdout.readline(), remaining)
        except TimeoutError:
            await self.cancel()
            raise SshTimeout(self.name, f"`{_short(self.command)}` on {self.name} ran past {self.timeout:g} s and "
                                        f"was stopped; check the host or allow it more time.") from None
        except asyncio.CancelledError:
            await self.cancel()
            raise
        except (asyncssh.ConnectionLost, asyncssh.DisconnectError) as exc:
            await self.cancel()
            raise _connect_error(self.pool.target(self.name), exc) from None
        if line:
            text = line.rstrip("\r\n")
            if self.pty:
                self._stderr.append(text)
            return text
        await self._finish()
        raise StopAsyncIteration

    async def _finish(self) -> None:
        assert self._proc is not None
        lost = False
        try:
            done = await asyncio.wait_for(self._proc.wait(check=False), 10.0)
            self.exit_signal = done.exit_signal[0] if done.exit_signal else None
            self.exit_status = done.exit_status if self.exit_signal is None else None
            lost = done.exit_status is None and done.exit_signal is None
        except TimeoutError:
            await _kill(self._proc)
        if self._stderr_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stderr_task, 2.0)
        self._finished = True
        self._release()
        if lost:
            # The output ended because the link did, not because the command finished.
            raise _lost_error(self.pool.target(self.name), self.command)

    async def cancel(self) -> None:
        """Kill the remote command (if it still runs) and free the session."""
        if self._finished:
            return
        self._finished = True
        if self._proc is not None:
            await _kill(self._proc)
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stderr_task
        self._release()

    async def wait(self) -> CommandResult:
        """Drain the remaining output and return the result (output lines are not kept)."""
        async for _ in self:
            pass
        return CommandResult(self.command, self.exit_status, "", "\n".join(self._stderr), self.exit_signal)

    async def __aenter__(self) -> RemoteStream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()
