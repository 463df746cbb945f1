"""The simulated machines' shell: parses a command line like ``sh -c`` and runs built-in handlers.

Parsing uses the standard POSIX lexer (:mod:`shlex` with ``punctuation_chars``) so quoting behaves as in
a real shell: a value quoted by ``epiconsole.config.fill`` such as ``'x; rm -rf ~'`` stays one literal
argument. Grammar: simple commands with redirections (``>``, ``>>``, ``<``, ``N>``, ``N>&M``, ``&>``)
joined by ``|`` into pipelines, pipelines joined by ``&&`` / ``||``, lists separated by ``;`` or ``&``
(background). Not supported (answered as a syntax error or taken literally): variables, globbing of
real paths, tilde expansion, subshells, here-documents.

Handlers answer the lab's default command templates the way a Raspberry Pi 5 or the DGX does, reading
and changing the shared :class:`~epiconsole.sim.state.SimLab`. Only fixed system paths are virtual:
``/sys`` and ``/proc`` files (governor, load average, the DS18B20), and files directly in ``/tmp``, which
are private per machine (a directory under the lab dir) so the four simulated Pis' log files do not
collide. Every
other path is a real path on this machine (the simulated lab's config points them into its directory).

Every command runs as a task registered in its :class:`Machine`'s process table, so ``pkill -f`` finds
it, ``timeout`` and a closed SSH channel cancel it, and :meth:`Machine.shutdown` leaves nothing behind.
Background jobs (``&``) belong to the machine and outlive the session, like ``setsid nohup`` daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epiconsole.sim.state import SimLab

GOVERNOR_GLOB = "/sys/devices/system/cpu/cpufreq/policy*/scaling_governor"
GOVERNOR_PATH = "/sys/devices/system/cpu/cpufreq/policy0/scaling_governor"
AVAILABLE_GOVERNORS_PATH = "/sys/devices/system/cpu/cpufreq/policy0/scaling_available_governors"
#: Governors the simulated sysfs accepts; anything else fails with EINVAL like the kernel's.
GOVERNORS = ("performance", "ondemand", "powersave", "schedutil")
DS18B20_PATH = "/sys/bus/w1/devices/28-3c01d607e2a1/temperature"
LOADAVG_PATH = "/proc/loadavg"
DGX_KERNEL = "6.11.0-1016-nvidia"
DLLAMA_VERSION = "dllama 0.16.2 (simulated)"
#: Virtual seconds the simulated root takes to load its model before the API answers.
MODEL_LOAD_S = 30.0
#: Virtual seconds the simulated converters take.
CONVERT_S = 20.0
MANIFEST_NAMES = ("epi-surgery.json", "surgery_manifest.json")
SIGTERM_STATUS = 128 + signal.SIGTERM
SIGKILL_STATUS = 128 + signal.SIGKILL


# --------------------------------------------------------------------------------------------------
# Parsing


class ShellSyntaxError(Exception):
    pass


@dataclass(frozen=True)
class Redirect:
    fd: int
    op: str  # '>', '>>', '<', '>&', '&>'
    target: str


@dataclass(frozen=True)
class Simple:
    argv: tuple[str, ...]
    redirects: tuple[Redirect, ...] = ()


@dataclass(frozen=True)
class Pipeline:
    commands: tuple[Simple, ...]


@dataclass(frozen=True)
class AndOr:
    first: Pipeline
    rest: tuple[tuple[str, Pipeline], ...] = ()
    background: bool = False


OPERATORS = ("&&", "||", ">>", ">&", "&>", "<&", ";", "&", "|", ">", "<", "(", ")", "\n")
#: An unquoted newline ends a command like ``;`` (templates written as TOML multi-line strings have them).
NEWLINE = "\n"
_REDIRECT_OPS = (">", ">>", "<", ">&", "&>", "<&")


@dataclass(frozen=True)
class _Tok:
    text: str
    op: bool
    #: A word written directly against the next token (``2>``), which makes a digit word an fd number.
    glued: bool = False


def _split_ops(run: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(run):
        for op in OPERATORS:
            if run.startswith(op, i):
                out.append(op)
                i += len(op)
                break
        else:  # pragma: no cover - every punctuation char starts an operator
            raise ShellSyntaxError(f'Syntax error: "{run[i]}" unexpected')
    return out


def _escaped(source: str, index: int) -> bool:
    """Whether the character at ``index`` is escaped: preceded by an odd run of backslashes."""
    run = 0
    while index - run - 1 >= 0 and source[index - run - 1] == "\\":
        run += 1
    return run % 2 == 1


def tokenize(source: str) -> list[_Tok]:
    """POSIX words and operators; quoted or escaped operator characters stay words."""
    lex = shlex.shlex(source, posix=True, punctuation_chars="();<>|&" + NEWLINE)
    lex.whitespace = " \t\r"
    lex.whitespace_split = True
    lex.commenters = ""
    punct = set(lex.punctuation_chars)
    toks: list[_Tok] = []
    try:
        while (text := lex.get_token()) is not None:
            pos = lex.instream.tell() - len(lex._pushback_chars)  # where the lexer stopped
            # A word ends by consuming the blank after it; anything else that ended it was pushed back.
            end = pos - 1 if pos > 0 and source[pos - 1] in lex.whitespace else pos
            raw = source[end - len(text): end] if len(text) <= end else ""
            is_op = bool(text) and set(text) <= punct and raw == text and not _escaped(source, end - len(text))
            if is_op:
                toks.extend(_Tok(op, True) for op in _split_ops(text))
            else:
                toks.append(_Tok(text, False, glued=end == pos))
    except ValueError as exc:  # "No closing quotation"
        raise ShellSyntaxError(f"Syntax error: {exc}") from None
    return toks


def parse(source: str) -> list[AndOr]:
    """Parse a command line into and-or lists (see the module docstring for the grammar)."""
    toks = tokenize(source)
    i = 0
    lists: list[AndOr] = []

    def peek() -> _Tok | None:
        return toks[i] if i < len(toks) else None

    def unexpected(t: _Tok | None) -> ShellSyntaxError:
        return ShellSyntaxError(f'Syntax error: "{t.text if t else "end of file"}" unexpected')

    def simple() -> Simple:
        nonlocal i
        argv: list[str] = []
        redirects: list[Redirect] = []
        while (t := peek()) is not None:
            if t.op and t.text in _REDIRECT_OPS:
                fd = 0 if t.text in ("<", "<&") else 1
                i += 1
            elif (not t.op and t.glued and t.text.isdigit() and i + 1 < len(toks) and toks[i + 1].op
                  and toks[i + 1].text in _REDIRECT_OPS and toks[i + 1].text != "&>"):
                fd, t = int(t.text), toks[i + 1]
                i += 2
            elif t.op:
                break
            else:
                argv.append(t.text)
                i += 1
                continue
            target = peek()
            if target is None or target.op:
                raise unexpected(target)
            i += 1
            redirects.append(Redirect(fd, t.text, target.text))
        if not argv and not redirects:
            raise unexpected(peek())
        return Simple(tuple(argv), tuple(redirects))

    def newlines() -> None:
        """Skip blank lines (allowed before a command and after ``|``, ``&&``, ``||``, ``;``, ``&``)."""
        nonlocal i
        while (t := peek()) is not None and t.op and t.text == NEWLINE:
            i += 1

    def pipeline() -> Pipeline:
        nonlocal i
        cmds = [simple()]
        while (t := peek()) is not None and t.op and t.text == "|":
            i += 1
            newlines()
            cmds.append(simple())
        return Pipeline(tuple(cmds))

    newlines()
    while i < len(toks):
        first = pipeline()
        rest: list[tuple[str, Pipeline]] = []
        while (t := peek()) is not None and t.op and t.text in ("&&", "||"):
            i += 1
            newlines()
            rest.append((t.text, pipeline()))
        background = False
        t = peek()
        if t is not None:
            if not t.op or t.text not in (";", "&", NEWLINE):
                raise unexpected(t)
            background = t.text == "&"
            i += 1
        lists.append(AndOr(first, tuple(rest), background))
        newlines()
    return lists


# --------------------------------------------------------------------------------------------------
# Streams


class Sink:
    """Where a command's output goes."""

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Called by the owner of the sink (a redirection or a pipe), never by a command."""


class NullSink(Sink):
    async def write(self, data: bytes) -> None:
        return None


class CallbackSink(Sink):
    """Output to an SSH channel (or any callable), newline-translated when the session has a pty."""

    def __init__(self, write: Callable[[bytes], None], crlf: bool = False) -> None:
        self._write, self._crlf = write, crlf

    async def write(self, data: bytes) -> None:
        if self._crlf:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._write(data)
        await asyncio.sleep(0)  # let the channel flush between chunks


class FileSink(Sink):
    def __init__(self, path: Path, append: bool) -> None:
        self._f = open(path, "ab" if append else "wb")  # noqa: SIM115 - closed by close()

    async def write(self, data: bytes) -> None:
        self._f.write(data)
        self._f.flush()

    async def close(self) -> None:
        self._f.close()


class Source:
    """Where a command's input comes from."""

    async def read(self) -> bytes | None:
        """The next chunk, or None at end of input."""
        return None

    async def read_all(self) -> bytes:
        chunks = []
        while (chunk := await self.read()) is not None:
            chunks.append(chunk)
        return b"".join(chunks)


class QueueSource(Source):
    """Input fed chunk by chunk (an SSH channel's data, or a pipe); None marks the end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._eof = False

    async def read(self) -> bytes | None:
        if self._eof:
            return None
        chunk = await self.queue.get()
        if chunk is None:
            self._eof = True
        return chunk


class Pipe(Sink):
    def __init__(self) -> None:
        self.source = QueueSource()

    async def write(self, data: bytes) -> None:
        if data:
            self.source.queue.put_nowait(data)

    async def close(self) -> None:
        self.source.queue.put_nowait(None)


class BytesSource(Source):
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    async def read(self) -> bytes | None:
        data, self._data = self._data, None
        return data or None


@dataclass
class Io:
    stdin: Source
    stdout: Sink
    stderr: Sink

    async def out(self, text: str) -> None:
        await self.stdout.write(text.encode())

    async def err(self, text: str) -> None:
        await self.stderr.write(text.encode())


# --------------------------------------------------------------------------------------------------
# Machines and processes


@dataclass
class Proc:
    pid: int
    cmdline: str
    task: asyncio.Task[Any] | None = None
    #: Set when a signal (pkill, timeout) ended it, for the exit status.
    killed_by: int | None = None
    #: A real OS process started for it (the ``epiconsole`` CLI on the DGX).
    os_pid: int | None = None


@dataclass
class Machine:
    """One simulated host: its name, kind ('pi' or 'dgx'), process table, and private /tmp."""

    name: str
    lab: SimLab
    root_dir: Path
    kind: str = "pi"
    api_factory: Callable[[SimLab], Any] | None = None
    procs: dict[int, Proc] = field(default_factory=dict)
    jobs: set[asyncio.Task[Any]] = field(default_factory=set)
    _next_pid: int = 1000

    @property
    def tmp(self) -> Path:
        path = self.root_dir / self.name / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def new_pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def running(self) -> list[Proc]:
        """Processes alive on the machine (tests use it to prove nothing was left behind)."""
        return [p for p in self.procs.values() if p.task is None or not p.task.done()]

    def start_job(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)
        return task

    def kill(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        proc.killed_by = sig
        if proc.task is not None and not proc.task.done():
            proc.task.cancel()

    async def shutdown(self) -> None:
        """Cancel every job and command of this machine and wait for them (their cleanup included)."""
        tasks = [*self.jobs, *(p.task for p in self.procs.values() if p.task is not None)]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(t, 10.0)


Handler = Callable[["Shell", list[str], Io], Awaitable[int]]

#: The process the running handler belongs to (per task, so concurrent pipeline members do not mix).
CURRENT: ContextVar[Proc | None] = ContextVar("sim_shell_proc", default=None)
#: Set under ``setsid``/``nohup``: what runs there (nested shells' background jobs too) ignores a hang-up.
DETACHED: ContextVar[bool] = ContextVar("sim_shell_detached", default=False)


class Shell:
    """Runs command lines on one :class:`Machine` (one instance per session; ``cd`` changes its cwd)."""

    def __init__(self, machine: Machine, cwd: Path | None = None, *, root: bool = False,
                 jobs: list[tuple[asyncio.Task[Any], bool]] | None = None) -> None:
        self.m = machine
        self.lab = machine.lab
        self.cwd = cwd or Path.home()
        self.root = root
        #: Background jobs started by this shell and the shells it runs (``sh -c``): without job control
        #: they share the session's process group, so a hang-up kills the ones not under setsid/nohup.
        self.jobs: list[tuple[asyncio.Task[Any], bool]] = [] if jobs is None else jobs

    # -- paths -----------------------------------------------------------------------------------

    def path(self, arg: str) -> Path:
        """A real path for an argument: files directly in /tmp are private to the machine (deeper paths,
        such as the lab's own temporary directory, stay real); relative paths use the cwd."""
        if arg.startswith("/tmp/") and "/" not in arg[len("/tmp/"):]:
            return self.m.tmp / arg[len("/tmp/"):]
        p = Path(arg)
        return p if p.is_absolute() else self.cwd / p

    def virtual_files(self) -> dict[str, Callable[[], str]]:
        """The read-only system files this machine shows (path -> current content)."""
        files: dict[str, Callable[[], str]] = {LOADAVG_PATH: self._loadavg}
        if self.m.kind == "pi":
            files[GOVERNOR_PATH] = lambda: self.lab.node(self.m.name).governor + "\n"
            files[AVAILABLE_GOVERNORS_PATH] = lambda: " ".join(GOVERNORS) + "\n"
            if self.lab.cfg.cluster.ambient_host == self.m.name:
                files[DS18B20_PATH] = lambda: f"{round(self.lab.ambient_c() * 1000)}\n"
        return files

    def match_virtual(self, pattern: str) -> list[str]:
        """Virtual paths named by an argument, expanding ``*`` the way the shell's glob would."""
        files = self.virtual_files()
        if any(c in pattern for c in "*?["):
            return sorted(p for p in files if fnmatch.fnmatchcase(p, pattern))
        return [pattern] if pattern in files else []

    def _loadavg(self) -> str:
        busy = self.lab.busy if self.m.kind == "pi" else False
        running = len(self.m.running())
        return ("3.97 3.41 2.05" if busy else "0.08 0.11 0.09") + f" {max(1, running)}/187 {self.m._next_pid}\n"

    # -- running ---------------------------------------------------------------------------------

    async def run_script(self, source: str, io: Io) -> int:
        """Run a whole command line; the exit status of the last command, like ``sh -c``."""
        try:
            lists = parse(source)
        except ShellSyntaxError as exc:
            await io.err(f"sh: 1: {exc}\n")
            return 2
        status = 0
        for and_or in lists:
            if and_or.background:
                protected = DETACHED.get() or and_or.first.commands[0].argv[:1] in (("setsid",), ("nohup",))
                job = self.m.start_job(self._and_or(and_or, io))
                self.jobs.append((job, protected))
                status = 0
            else:
                status = await self._and_or(and_or, io)
        return status

    async def _and_or(self, node: AndOr, io: Io) -> int:
        status = await self._pipeline(node.first, io)
        for op, pipeline in node.rest:
            if (op == "&&" and status == 0) or (op == "||" and status != 0):
                status = await self._pipeline(pipeline, io)
        return status

    async def _pipeline(self, pipeline: Pipeline, io: Io) -> int:
        if len(pipeline.commands) == 1:
            return await self._simple(pipeline.commands[0], io)
        steps = []
        stdin = io.stdin
        for k, cmd in enumerate(pipeline.commands):
            last = k == len(pipeline.commands) - 1
            pipe = None if last else Pipe()
            steps.append(self._piped(cmd, Io(stdin, pipe or io.stdout, io.stderr), pipe))
            if pipe is not None:
                stdin = pipe.source
        statuses = await asyncio.gather(*steps)
        return statuses[-1]

    async def _piped(self, cmd: Simple, io: Io, pipe: Pipe | None) -> int:
        try:
            return await self._simple(cmd, io)
        finally:
            if pipe is not None:
                await pipe.close()

    async def _simple(self, cmd: Simple, io: Io) -> int:
        opened: list[Sink] = []
        try:
            try:
                io = self._redirect(cmd.redirects, io, opened)
            except OSError as exc:
                await io.err(f"sh: 1: cannot {exc.args[0]}\n")
                return 2
            if not cmd.argv:
                return 0
            return await self.spawn(list(cmd.argv), io)
        finally:
            for sink in opened:
                await sink.close()

    def _redirect(self, redirects: Sequence[Redirect], io: Io, opened: list[Sink]) -> Io:
        fds: dict[int, Any] = {0: io.stdin, 1: io.stdout, 2: io.stderr}
        for r in redirects:
            if r.op == "<":
                if r.target == "/dev/null":
                    fds[0] = Source()
                else:
                    path = self.path(r.target)
                    try:
                        fds[0] = BytesSource(path.read_bytes())
                    except OSError:
                        raise OSError(f"open {r.target}: No such file") from None
            elif r.op in (">&", "<&") and r.target.isdigit():
                if int(r.target) not in fds:
                    raise OSError(f"dup {r.target}: Bad file descriptor")
                fds[r.fd] = fds[int(r.target)]
            else:
                sink = self._open_sink(r.target, append=r.op == ">>")
                if not isinstance(sink, NullSink):
                    opened.append(sink)
                if r.op in ("&>", ">&"):
                    fds[1] = fds[2] = sink
                else:
                    fds[r.fd] = sink
        return Io(fds[0], fds[1], fds[2])

    def _open_sink(self, target: str, append: bool) -> Sink:
        if target == "/dev/null":
            return NullSink()
        if target.startswith(("/sys/", "/proc/")):
            raise OSError(f"create {target}: Permission denied")
        path = self.path(target)
        if not path.parent.is_dir():
            raise OSError(f"create {target}: Directory nonexistent")
        return FileSink(path, append)

    async def spawn(self, argv: list[str], io: Io) -> int:
        """Run one command as its own registered process; 128+signal when pkill or timeout ended it."""
        proc = Proc(self.m.new_pid(), " ".join(argv))
        task = asyncio.ensure_future(self.exec(argv, io, proc))
        proc.task = task
        self.m.procs[proc.pid] = proc
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if proc.killed_by is not None and not (me is not None and me.cancelling()):
                return 128 + proc.killed_by
            raise
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self.m.procs.pop(proc.pid, None)

    async def exec(self, argv: list[str], io: Io, proc: Proc | None = None) -> int:
        """Run ``argv`` in the current task (wrappers like ``sudo`` exec their command this way)."""
        if proc is not None:
            proc.cmdline = " ".join(argv)
            CURRENT.set(proc)
        name = argv[0].rsplit("/", 1)[-1]
        handler = COMMON.get(name) or (PI if self.m.kind == "pi" else DGX).get(name)
        if handler is None:
            await io.err(f"sh: 1: {argv[0]}: not found\n")
            return 127
        return await handler(self, argv, io)

    def login_process(self, command: str) -> Proc | None:
        """Register the login shell that runs ``command`` over SSH, as ``pkill -f`` on a Pi would see it.

        Like bash, a lone simple command is exec'd (no shell process remains); anything compound keeps
        ``bash -c COMMAND`` alive, and a ``pkill -f PATTERN`` whose pattern appears in the command line
        kills that shell too, exactly as on real hardware (hence ``pkill -f '[d]llama worker'``).
        """
        try:
            lists = parse(command)
        except ShellSyntaxError:
            return None
        if len(lists) == 1 and not lists[0].rest and not lists[0].background and len(lists[0].first.commands) == 1:
            return None
        proc = Proc(self.m.new_pid(), f"bash -c {command}", asyncio.current_task())
        self.m.procs[proc.pid] = proc
        return proc

    def hangup(self) -> None:
        """The session's terminal hung up: background jobs not started with setsid/nohup die with it."""
        for job, protected in self.jobs:
            if not protected:
                job.cancel()


# --------------------------------------------------------------------------------------------------
# Handlers: common


def _duration(text: str) -> float:
    """``sleep``/``timeout`` durations: a number with an optional s/m/h/d suffix."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


async def h_true(sh: Shell, argv: list[str], io: Io) -> int:
    return 0


async def h_false(sh: Shell, argv: list[str], io: Io) -> int:
    return 1


async def h_echo(sh: Shell, argv: list[str], io: Io) -> int:
    args = argv[1:]
    newline = True
    if args and args[0] == "-n":
        newline, args = False, args[1:]
    await io.out(" ".join(args) + ("\n" if newline else ""))
    return 0


async def h_cd(sh: Shell, argv: list[str], io: Io) -> int:
    target = sh.path(argv[1]) if len(argv) > 1 else Path.home()
    if not target.is_dir():
        await io.err(f"sh: 1: cd: can't cd to {argv[1] if len(argv) > 1 else target}\n")
        return 2
    sh.cwd = target
    return 0


async def h_sleep(sh: Shell, argv: list[str], io: Io) -> int:
    try:
        seconds = sum(_duration(a) for a in argv[1:]) if len(argv) > 1 else None
    except ValueError as exc:
        await io.err(f"sleep: invalid time interval '{exc}'\n")
        return 1
    if seconds is None:
        await io.err("sleep: missing operand\n")
        return 1
    await sh.lab.clock.sleep(seconds)
    return 0


async def h_sudo(sh: Shell, argv: list[str], io: Io) -> int:
    args = argv[1:]
    while args and args[0].startswith("-"):
        args = args[1:]
    if not args:
        await io.err("usage: sudo command\n")
        return 1
    was, sh.root = sh.root, True
    try:
        return await sh.exec(args, io, CURRENT.get())
    finally:
        sh.root = was


async def h_wrapper(sh: Shell, argv: list[str], io: Io) -> int:
    """``setsid`` and ``nohup``: run the command (the detachment itself is the job table's business)."""
    args = [a for a in argv[1:]]
    while args and args[0].startswith("-") and argv[0].endswith("setsid"):
        args = args[1:]
    if not args:
        await io.err(f"{argv[0]}: missing operand\n")
        return 1 if argv[0] == "setsid" else 125
    token = DETACHED.set(True)
    try:
        return await sh.exec(args, io, CURRENT.get())
    finally:
        DETACHED.reset(token)


async def h_timeout(sh: Shell, argv: list[str], io: Io) -> int:
    """``timeout [-s SIG] [-k DUR] DUR CMD...`` with DUR in virtual seconds; 124 when it expired."""
    args = argv[1:]
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-s", "--signal", "-k", "--kill-after") and args:
            args.pop(0)
    try:
        limit = _duration(args[0])
    except (ValueError, IndexError):
        await io.err("timeout: invalid time interval\n")
        return 125
    if len(args) < 2:
        await io.err("timeout: missing operand\n")
        return 125
    inner = asyncio.ensure_future(sh.spawn(args[1:], io))
    try:
        return await asyncio.wait_for(asyncio.shield(inner), sh.lab.clock.real_seconds(limit))
    except TimeoutError:
        return 124
    finally:
        if not inner.done():
            inner.cancel()
            with contextlib.suppress(BaseException):
                await inner


async def h_sh(sh: Shell, argv: list[str], io: Io) -> int:
    if len(argv) < 3 or argv[1] != "-c":
        await io.err(f"{argv[0]}: only '{argv[0]} -c COMMAND' is available here\n")
        return 2
    sub = Shell(sh.m, sh.cwd, root=sh.root, jobs=sh.jobs)
    return await sub.run_script(argv[2], io)


async def h_pkill(sh: Shell, argv: list[str], io: Io) -> int:
    """``pkill [-SIG] -f PATTERN`` / ``pgrep -f PATTERN``: match full command lines of this machine only."""
    sig = signal.SIGTERM
    full = False
    pattern = None
    for a in argv[1:]:
        if a == "-f":
            full = True
        elif a.startswith("-") and a[1:].isdigit():
            sig = signal.Signals(int(a[1:]))
        elif a.startswith("-") and len(a) > 2 and a[1:].isupper():
            sig = signal.Signals["SIG" + a[1:].removeprefix("SIG")]
        elif a.startswith("-"):
            await io.err(f"{argv[0]}: invalid option -- '{a.lstrip('-')}'\n")
            return 2
        else:
            pattern = a
    if pattern is None:
        await io.err(f"{argv[0]}: no matching criteria specified\n")
        return 2
    try:
        rx = re.compile(pattern)
    except re.error:
        await io.err(f"{argv[0]}: invalid regular expression\n")
        return 2
    me = CURRENT.get()
    found = []
    for proc in list(sh.m.procs.values()):
        if proc is me or (proc.task is not None and proc.task.done()):
            continue
        text = proc.cmdline if full else proc.cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]
        if rx.search(text):
            found.append(proc)
    if argv[0].endswith("pgrep"):
        for proc in found:
            await io.out(f"{proc.pid}\n")
    else:
        for proc in found:
            sh.m.kill(proc, sig)
        await asyncio.sleep(0)
    return 0 if found else 1


async def h_uname(sh: Shell, argv: list[str], io: Io) -> int:
    kernel = sh.lab.node(sh.m.name).kernel if sh.m.kind == "pi" else DGX_KERNEL
    parts = {"-s": "Linux", "-r": kernel, "-m": "aarch64", "-n": sh.m.name}
    if len(argv) == 1:
        await io.out("Linux\n")
    elif argv[1:] == ["-a"]:
        await io.out(f"Linux {sh.m.name} {kernel} #1 SMP PREEMPT aarch64 GNU/Linux\n")
    else:
        await io.out(" ".join(parts.get(a, "unknown") for a in argv[1:]) + "\n")
    return 0


async def h_cat(sh: Shell, argv: list[str], io: Io) -> int:
    status = 0
    if len(argv) == 1:
        while (chunk := await io.stdin.read()) is not None:
            await io.stdout.write(chunk)
        return 0
    for arg in argv[1:]:
        virtual = sh.match_virtual(arg)
        if virtual:
            files = sh.virtual_files()
            for p in virtual:
                await io.out(files[p]())
            continue
        path = sh.path(arg)
        if arg.startswith(("/sys/", "/proc/")) or not path.exists():
            await io.err(f"cat: {arg}: No such file or directory\n")
            status = 1
        elif path.is_dir():
            await io.err(f"cat: {arg}: Is a directory\n")
            status = 1
        else:
            with path.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, 1 << 20):
                    await io.stdout.write(chunk)
    return status


async def h_tee(sh: Shell, argv: list[str], io: Io) -> int:
    append = "-a" in argv[1:]
    targets = [a for a in argv[1:] if not a.startswith("-")]
    data = await io.stdin.read_all()
    status = 0
    for arg in targets:
        virtual = sh.match_virtual(arg) if arg.startswith("/sys/") else []
        if arg.startswith(("/sys/", "/proc/")):
            writable = [p for p in virtual if p == GOVERNOR_PATH]
            if not writable:
                await io.err(f"tee: {arg}: {'Permission denied' if virtual else 'No such file or directory'}\n")
                status = 1
            elif not sh.root:
                await io.err(f"tee: {arg}: Permission denied\n")
                status = 1
            else:
                value = data.decode(errors="replace").strip()
                if value not in GOVERNORS:
                    await io.err(f"tee: {writable[0]}: Invalid argument\n")
                    status = 1
                else:
                    sh.lab.node(sh.m.name).governor = value
            continue
        try:
            with sh.path(arg).open("ab" if append else "wb") as f:
                f.write(data)
        except OSError as exc:
            await io.err(f"tee: {arg}: {exc.strerror}\n")
            status = 1
    await io.stdout.write(data)
    return status


async def h_stat(sh: Shell, argv: list[str], io: Io) -> int:
    fmt = None
    files: list[str] = []
    args = argv[1:]
    while args:
        a = args.pop(0)
        if a in ("-c", "--format") and args:
            fmt = args.pop(0)
        elif a.startswith("--format="):
            fmt = a.split("=", 1)[1]
        else:
            files.append(a)
    if fmt is None:
        await io.err("stat: only 'stat -c FORMAT FILE...' is available here\n")
        return 1
    status = 0
    for arg in files:
        path = sh.path(arg)
        try:
            st = path.stat()
        except OSError:
            await io.err(f"stat: cannot statx '{arg}': No such file or directory\n")
            status = 1
            continue
        await io.out(fmt.replace("%s", str(st.st_size)).replace("%n", arg) + "\n")
    return status


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def h_sha256sum(sh: Shell, argv: list[str], io: Io) -> int:
    files = [a for a in argv[1:] if not a.startswith("-")]
    if not files:
        digest = hashlib.sha256(await io.stdin.read_all()).hexdigest()
        await io.out(f"{digest}  -\n")
        return 0
    status = 0
    for arg in files:
        path = sh.path(arg)
        if path.is_dir():
            await io.err(f"sha256sum: {arg}: Is a directory\n")
            status = 1
            continue
        try:
            digest = await asyncio.to_thread(_sha256, path)
        except OSError:
            await io.err(f"sha256sum: {arg}: No such file or directory\n")
            status = 1
            continue
        await io.out(f"{digest}  {arg}\n")
    return status


_REMOTE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^/:]+):(?P<path>.*)$")


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or tree like ``rsync -a`` (through a temporary name, then rename, as rsync does)."""
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
        return
    tmp = dst.with_name(f".{dst.name}.rsync-tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


async def h_rsync(sh: Shell, argv: list[str], io: Io) -> int:
    """``rsync [-a --partial ...] SRC... DEST``; DEST may be ``[user@]host:path``. Every simulated machine
    shares this machine's filesystem, so the copy is local."""
    operands = [a for a in argv[1:] if not a.startswith("-")]
    if len(operands) < 2:
        await io.err("rsync: need at least one source and a destination\nrsync error: syntax or usage error (code 1)\n")
        return 1
    *sources, dest = operands
    m = _REMOTE.match(dest)
    if m and not dest.startswith(("/", ".")):
        host = m.group("host")
        if host in sh.lab.nodes and not sh.lab.is_up(host):
            await io.err(f"ssh: connect to host {host} port 22: Connection refused\nrsync: connection unexpectedly "
                         f"closed (0 bytes received so far) [sender]\nrsync error: unexplained error (code 255)\n")
            return 255
        dest = m.group("path") or "."
    dest_path = sh.path(dest)
    into_dir = dest.endswith("/") or len(sources) > 1 or dest_path.is_dir()
    if into_dir and not dest_path.is_dir():
        try:
            dest_path.mkdir()
        except OSError as exc:
            await io.err(f'rsync: [Receiver] mkdir "{dest}" failed: {exc.strerror} ({exc.errno})\n'
                         f"rsync error: error in file IO (code 11)\n")
            return 11
    status = 0
    for src in sources:
        src_path = sh.path(src)
        if not src_path.exists():
            await io.err(f'rsync: [sender] link_stat "{src_path}" failed: No such file or directory (2)\n')
            status = 23
            continue
        target = dest_path / src_path.name if into_dir else dest_path
        if src.endswith("/") and src_path.is_dir():
            target = dest_path
        await asyncio.to_thread(_copy, src_path, target)
    if status:
        await io.err("rsync error: some files/attrs were not transferred (see previous errors) (code 23)\n")
    return status


# --------------------------------------------------------------------------------------------------
# Handlers: the Pi


async def h_vcgencmd(sh: Shell, argv: list[str], io: Io) -> int:
    lab, name = sh.lab, sh.m.name
    args = argv[1:]
    if args == ["measure_temp"]:
        await io.out(f"temp={lab.temperature(name):.1f}'C\n")
    elif args == ["get_throttled"]:
        await io.out(f"throttled=0x{lab.throttled(name):x}\n")
    elif args == ["measure_clock", "arm"]:
        # Pi 5 firmware labels the arm clock frequency(0).
        await io.out(f"frequency(0)={lab.arm_clock_hz(name)}\n")
    elif not args:
        await io.err("usage: vcgencmd [-t] command\n")
        return 255
    else:
        await io.out(f'error=2 error_msg="Command not registered: {args[0]}"\n')
        return 255
    return 0


def _flags(args: Sequence[str]) -> dict[str, list[str]]:
    """``--name value...`` options (a flag takes every following word up to the next ``--``)."""
    out: dict[str, list[str]] = {}
    key = None
    for a in args:
        if a.startswith("--"):
            key = a[2:]
            out[key] = []
        elif key is not None:
            out[key].append(a)
    return out


async def _forever() -> None:
    await asyncio.Event().wait()


async def h_dllama(sh: Shell, argv: list[str], io: Io) -> int:
    node = sh.lab.node(sh.m.name)
    if argv[1:] == ["--version"]:
        await io.out(DLLAMA_VERSION + "\n")
        return 0
    if len(argv) < 2 or argv[1] != "worker":
        await io.err("Usage: dllama <inference|chat|worker> ... (simulated: worker and --version)\n")
        return 1
    flags = _flags(argv[2:])
    port = (flags.get("port") or ["9998"])[0]
    await io.out(f"Listening on 0.0.0.0:{port}... (simulated worker on {sh.m.name})\n")
    node.worker_running = True
    try:
        await _forever()
    finally:
        node.worker_running = False
    return 0  # pragma: no cover - only a signal ends a worker


def _default_api_factory(lab: SimLab) -> Any:
    from epiconsole.sim.api import SimApi

    return SimApi(lab)


async def h_dllama_api(sh: Shell, argv: list[str], io: Io) -> int:
    from epiconsole.sim.modelfile import read_model_file

    flags = _flags(argv[1:])
    model, tokenizer, port = (flags.get(k, [""]) or [""] for k in ("model", "tokenizer", "port"))
    if not model[0] or not port[0].isdigit():
        await io.err("Usage: dllama-api --port P --model M --tokenizer T --buffer-float-type q80 ...\n")
        return 1
    try:
        deployed = await asyncio.to_thread(read_model_file, sh.path(model[0]))
    except OSError:
        await io.err(f"🚨 Cannot open model file {model[0]}\n")
        return 1
    except (ValueError, TypeError):
        await io.err(f"🚨 {model[0]} is not a simulated dllama model file; the simulated root serves only models "
                     f"written by the simulated converter\n")
        return 1
    if not tokenizer[0] or not sh.path(tokenizer[0]).is_file():
        await io.err(f"🚨 Cannot open tokenizer file {tokenizer[0] or '(none)'}\n")
        return 1
    others = [n for n in sh.lab.nodes if n != sh.m.name]
    missing = [n for n in others if not (sh.lab.is_up(n) and sh.lab.node(n).worker_running)]
    if missing:
        await io.err(f"🚨 Cannot connect to worker on {missing[0]} (is `dllama worker` running there?)\n")
        return 1
    try:
        api = (sh.m.api_factory or _default_api_factory)(sh.lab)
    except ImportError as exc:
        await io.err(f"🚨 the simulated API is not available ({exc})\n")
        return 1
    node = sh.lab.node(sh.m.name)
    sh.lab.deployed = deployed
    node.root_running = True
    started = False
    try:
        await io.out(f"💿 Loading {model[0]} (simulated: {deployed.config_id})...\n")
        await sh.lab.clock.sleep(MODEL_LOAD_S)
        try:
            await api.start(int(port[0]))
        except OSError as exc:
            await io.err(f"🚨 Cannot bind port {port[0]}: {exc.strerror or exc}\n")
            return 1
        started = True
        await io.out(f"Server URL: http://127.0.0.1:{port[0]}/v1/\n")
        await _forever()
    finally:
        if started:
            with contextlib.suppress(Exception):
                await asyncio.shield(api.stop())
        if sh.lab.deployed is deployed:
            sh.lab.deployed = None
        node.root_running = False
    return 0  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# Handlers: the DGX


def _read_manifest(src: Path) -> dict[str, Any]:
    import json

    for name in MANIFEST_NAMES:
        path = src / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
    return {}


async def _convert_model(sh: Shell, args: list[str], io: Io) -> int:
    from epiconsole.sim.modelfile import write_model_file
    from epiconsole.sim.physics import Deployed

    if len(args) != 3:
        await io.err("Usage: python convert-hf.py <sourceFolderPath> <weightsFloatType> <name>\n")
        return 1
    src, wtype, name = sh.path(args[0]), args[1], args[2]
    if wtype not in ("q40", "q80", "f16", "f32"):
        await io.err(f"ValueError: Unsupported float type: {wtype}\n")
        return 1
    if not (src / "config.json").is_file():
        await io.err(f"FileNotFoundError: [Errno 2] No such file or directory: '{src / 'config.json'}'\n")
        return 1
    try:
        manifest = await asyncio.to_thread(_read_manifest, src)
    except ValueError as exc:
        await io.err(f"json.decoder.JSONDecodeError: {exc}\n")
        return 1
    request = manifest.get("request") or {}
    # The simulated lab models Qwen3-30B-A3B whatever the tiny stand-in checkpoint is called.
    deployed = Deployed(
        config_id=name,
        experts=int(request.get("experts") or 0),
        target=request.get("layers") if manifest else None,
        strategy=(manifest.get("strategy") or request.get("strategy")) if manifest else None,
    )
    out = sh.cwd / f"dllama_model_{name}_{wtype}.m"
    await io.out(f"💿 Converting {src} to {out.name} (simulated converter)\n")
    await sh.lab.clock.sleep(CONVERT_S)
    await asyncio.to_thread(write_model_file, out, deployed)
    await io.out(f"✅ {out.name} created\n")
    return 0


async def _convert_tokenizer(sh: Shell, args: list[str], io: Io) -> int:
    if len(args) != 2:
        await io.err("Usage: python convert-tokenizer-hf.py <tokenizerFolderPath> <name>\n")
        return 1
    src, name = sh.path(args[0]), args[1]
    if not src.is_dir():
        await io.err(f"FileNotFoundError: [Errno 2] No such file or directory: '{src}'\n")
        return 1
    out = sh.cwd / f"dllama_tokenizer_{name}.t"
    body = f"#SIMULATED-DLLAMA-TOKENIZER v1 {name}\n".encode() + bytes(range(256)) * 16
    await asyncio.to_thread(out.write_bytes, body)
    await io.out(f"✅ Created {out.name} (simulated tokenizer)\n")
    return 0


CONVERTERS = {"convert-hf.py": _convert_model, "convert-tokenizer-hf.py": _convert_tokenizer}


async def h_python3(sh: Shell, argv: list[str], io: Io) -> int:
    """Only distributed-llama's two converters exist on the simulated DGX."""
    if len(argv) < 2:
        await io.err("python3: an interactive interpreter is not available here\n")
        return 2
    script = argv[1].rsplit("/", 1)[-1]
    convert = CONVERTERS.get(script)
    if convert is None:
        await io.err(f"python3: can't open file '{sh.path(argv[1])}': [Errno 2] No such file or directory\n")
        return 2
    return await convert(sh, argv[2:], io)


async def _pump(reader: asyncio.StreamReader | None, sink: Sink) -> None:
    if reader is None:
        return
    while chunk := await reader.read(65536):
        await sink.write(chunk)


async def h_epiconsole(sh: Shell, argv: list[str], io: Io) -> int:
    """The real CLI (the surgeon toolkit) as a subprocess, its output streamed to the session."""
    # The surgeon's tensor-hash cache stays inside the lab, not in the user's cache directory.
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               EPICONSOLE_SURGEON_CACHE=str(sh.m.root_dir / sh.m.name / "surgeon-hashes.json"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epiconsole", *argv[1:], cwd=sh.cwd, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so a kill reaches whatever it starts
    )
    if (me := CURRENT.get()) is not None:
        me.os_pid = proc.pid
    try:
        await asyncio.gather(_pump(proc.stdout, io.stdout), _pump(proc.stderr, io.stderr))
        return await proc.wait()
    finally:
        if proc.returncode is None:
            # SIGTERM first, like a hang-up: the surgeon removes its partial output at once.
            for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
                if proc.returncode is not None:
                    break


COMMON: dict[str, Handler] = {
    "true": h_true,
    "false": h_false,
    "echo": h_echo,
    "cd": h_cd,
    "sleep": h_sleep,
    "sudo": h_sudo,
    "setsid": h_wrapper,
    "nohup": h_wrapper,
    "timeout": h_timeout,
    "sh": h_sh,
    "bash": h_sh,
    "pkill": h_pkill,
    "pgrep": h_pkill,
    "uname": h_uname,
    "cat": h_cat,
    "tee": h_tee,
    "stat": h_stat,
    "sha256sum": h_sha256sum,
    "rsync": h_rsync,
}
PI: dict[str, Handler] = {"vcgencmd": h_vcgencmd, "dllama": h_dllama, "dllama-api": h_dllama_api}
DGX: dict[str, Handler] = {"python3": h_python3, "epiconsole": h_epiconsole}
