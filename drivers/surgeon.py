"""The surgeon (the DGX) over SSH: run the surgery, validate, convert and push commands and stream their
progress back as typed events.

The surgeon CLI prints one JSON object per line on stdout with ``--json`` (``{"event":"tensor","done":3,
"total":40}``, ``{"event":"done",...}``, ``{"event":"error","message":...}``); each becomes a
:class:`SurgeonEvent` of that kind. Any other line (distributed-llama's converter, rsync, a Python
traceback) becomes a ``log`` event, so nothing the remote prints is lost. Commands are the lab's
templates (``surgery``, ``validate``, ``convert``, ``push``) filled here with shell-quoted values, as in
:mod:`drivers.cluster`.

A job runs under a pseudo-terminal (see :mod:`drivers.ssh`): cancelling it hangs up the remote shell,
so an aborted surgery leaves no process on the DGX. The pty merges the remote stderr into the stream;
the job's ``stderr_tail`` is therefore the tail of the non-JSON lines, which is where errors appear.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from drivers.cluster import check_push
from drivers.ssh import STDERR_TAIL, RemoteStream, SshPool
from drivers.templates import fill

SURGEON_TEMPLATES = frozenset({"surgery", "validate", "convert", "push"})


@dataclass(frozen=True)
class SurgeonEvent:
    """One progress event. ``kind`` is the JSON ``event`` field, or ``log`` for a non-JSON line."""

    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)
    line: str = ""

    @property
    def message(self) -> str:
        return str(self.data.get("message", self.line))


@dataclass(frozen=True)
class JobResult:
    """How a surgeon job ended. ``ok`` needs exit status 0 and no ``error`` event."""

    command: str
    exit_status: int | None
    exit_signal: str | None
    stderr_tail: tuple[str, ...]
    last_event: SurgeonEvent | None
    error: str | None
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and self.error is None and not self.cancelled


def parse_event(line: str) -> SurgeonEvent:
    """A JSON object with an ``event`` key becomes that event; anything else is a log line."""
    text = line.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            return SurgeonEvent(obj["event"], obj, line)
    return SurgeonEvent("log", {}, line)


class SurgeonJob:
    """A running surgeon command: ``async for event in job`` yields :class:`SurgeonEvent` values.

    ``await job.cancel()`` kills the remote process; ``await job.result()`` drains the stream and says
    how it ended. Use ``async with`` to make sure it is cancelled when the caller stops early.
    """

    def __init__(self, stream: RemoteStream) -> None:
        self._stream = stream
        self._last: SurgeonEvent | None = None
        self._error: str | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._cancelled = False

    @property
    def command(self) -> str:
        return self._stream.command

    def __aiter__(self) -> SurgeonJob:
        return self

    async def __anext__(self) -> SurgeonEvent:
        line = await self._stream.__anext__()
        event = parse_event(line)
        if event.kind == "log":
            if line.strip():
                self._log.append(line)
        else:
            self._last = event
            if event.kind == "error":
                self._error = event.message
        return event

    async def cancel(self) -> None:
        if not self._stream.finished:
            self._cancelled = True
        await self._stream.cancel()

    async def result(self) -> JobResult:
        """Drain the remaining events and report the exit status, stderr tail and last event."""
        async for _ in self:
            pass
        status, signal = self._stream.exit_status, self._stream.exit_signal
        error = self._error
        if error is None and status not in (0, None):
            error = self._log[-1] if self._log else f"exited with status {status}"
        if error is None and signal is not None and not self._cancelled:
            error = f"killed by signal {signal}"
        return JobResult(self.command, status, signal, tuple(self._log), self._last, error, self._cancelled)

    async def __aenter__(self) -> SurgeonJob:
        await self._stream.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()


class Surgeon:
    """The DGX: each method starts a job from the named template with shell-quoted values."""

    def __init__(self, pool: SshPool, templates: Mapping[str, str], *, host: str = "dgx") -> None:
        missing = SURGEON_TEMPLATES - set(templates)
        if missing:
            raise KeyError(f"command templates missing: {', '.join(sorted(missing))}")
        pool.target(host)
        self.pool, self.templates, self.host = pool, dict(templates), host

    def job(self, template: str, *, timeout: float | None = None, **values: Any) -> SurgeonJob:
        """Start the named template as a streamed job (the session opens on first iteration)."""
        command = fill(self.templates[template], **values)
        return SurgeonJob(self.pool.stream(self.host, command, timeout=timeout, pty=True))

    def surgery(self, *, source: str, experts: int, layers: str, strategy: str, profile: str, out: str,
                timeout: float | None = None) -> SurgeonJob:
        return self.job("surgery", timeout=timeout, source=source, experts=experts, layers=layers,
                        strategy=strategy, profile=profile, out=out)

    def validate(self, *, out: str, timeout: float | None = None) -> SurgeonJob:
        return self.job("validate", timeout=timeout, out=out)

    def convert(self, *, out: str, converter: str, tokenizer_converter: str, name: str,
                timeout: float | None = None) -> SurgeonJob:
        return self.job("convert", timeout=timeout, out=out, converter=converter,
                        tokenizer_converter=tokenizer_converter, name=name)

    def push(self, *, files: list[str], dest: str, timeout: float | None = None) -> SurgeonJob:
        """Copy ``files`` to ``[user@]host:dir/``; refuses values rsync's remote shell would interpret."""
        check_push(dest, files)
        return self.job("push", timeout=timeout, files=files, dest=dest)
