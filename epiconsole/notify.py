"""Notifications: run the configured command when a campaign finishes, fails, is suspended or resumes.

The lab's workflow messages the researcher; rather than bundle one messenger, epiconsole runs a shell
command (``[notify] command``) with the event as one JSON object on its stdin, so any messenger can be
plugged in (``curl`` to a webhook, ``mail``, ``ntfy``, a Signal CLI ...). The event kind is also in
``$EPICONSOLE_EVENT`` so a one-line command can branch without parsing JSON.

A notifier never stops a run: :func:`send` never raises, kills the command (its whole process group)
after ``[notify] timeout_s`` (30 s when that is not positive: there is no "wait forever") and reports failures through the ``log`` callback and its return value.
:class:`Notifier` fires notifications in the background so a slow messenger never holds up a stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from epiconsole.config import NotifyConfig

#: The events a campaign notifies about.
EVENTS = ("campaign_finished", "campaign_failed", "suspended", "resumed")

#: How much of the command's stderr a failure message quotes.
_STDERR_TAIL = 300
#: After a kill, how long to wait for the process to be reaped.
_REAP_TIMEOUT_S = 5.0
#: The limit when ``[notify] timeout_s`` is not positive: every wait has one, a notifier's too.
_FALLBACK_TIMEOUT_S = NotifyConfig().timeout_s


def _timeout(cfg: NotifyConfig) -> float:
    return cfg.timeout_s if cfg.timeout_s > 0 else _FALLBACK_TIMEOUT_S

Log = Callable[[str], None]


def make_event(kind: str, *, campaign_id: int | None = None, simulated: bool = False, message: str = "",
               t: float | None = None, **data: Any) -> dict[str, Any]:
    """The JSON object a notifier receives: ``event``, ``t`` (epoch s), ``host``, ``campaign_id``,
    ``simulated``, ``message`` and any extra fields (config_id, reason, suspender, trials_done ...)."""
    if kind not in EVENTS:
        raise ValueError(f"notification event must be one of {EVENTS}, not {kind!r}")
    event: dict[str, Any] = {
        "event": kind,
        "t": time.time() if t is None else t,
        "host": socket.gethostname(),
        "campaign_id": campaign_id,
        "simulated": bool(simulated),
        "message": message,
    }
    event.update(data)
    return event


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null (missing is null, never a number); unknown objects become their str()."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The command runs through the shell in a session of its own: kill the whole group so a
    # pipeline (`curl ... | tee`) does not outlive the timeout.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def send(cfg: NotifyConfig, event: Mapping[str, Any], *, log: Log | None = None) -> bool:
    """Run ``cfg.command`` with ``event`` as JSON on stdin. Never raises.

    Returns True when the command exited 0, or when no command is configured (nothing to deliver,
    nothing failed); False when it could not start, exited non-zero or ran past ``cfg.timeout_s``
    (then it is killed). Every failure is also reported, as one line, through ``log``.
    """
    command = cfg.command.strip()
    if not command:
        return True
    kind = str(event.get("event", "notification"))

    def fail(why: str) -> bool:
        if log is not None:
            with contextlib.suppress(Exception):  # a broken logger must not break the run either
                log(f"notifier for {kind} {why}")
        return False

    try:
        payload = (json.dumps(_json_safe(event), allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        return fail(f"could not encode the event as JSON ({exc})")
    env = {**os.environ, "EPICONSOLE_EVENT": kind}
    try:
        proc = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        return fail(f"could not start ({exc})")
    timeout = _timeout(cfg)
    try:
        # communicate() tolerates a command that exits without reading its stdin.
        _out, err = await asyncio.wait_for(proc.communicate(payload), timeout)
    except TimeoutError:
        _kill_group(proc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), _REAP_TIMEOUT_S)
        return fail(f"timed out after {timeout:g} s and was killed; raise [notify] timeout_s or fix the command")
    except asyncio.CancelledError:
        _kill_group(proc)
        # Reap it before going: an unreaped child's transport would be collected after its loop closed.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(proc.wait(), _REAP_TIMEOUT_S)
        raise
    except Exception as exc:  # noqa: BLE001 - a notifier must never stop the run
        _kill_group(proc)
        return fail(f"failed ({type(exc).__name__}: {exc})")
    if proc.returncode != 0:
        tail = (err or b"").decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        detail = f": {tail}" if tail else ""
        return fail(f"exited with status {proc.returncode}{detail}")
    return True


class Notifier:
    """Fires notifications in the background and owns the tasks (close it on shutdown).

    ``notify()`` returns at once; the command runs with its own timeout. ``aclose()`` waits for the
    ones in flight (bounded by the timeout) and then cancels what is left.
    """

    def __init__(self, cfg: NotifyConfig, *, log: Log | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self._tasks: set[asyncio.Task[bool]] = set()
        #: (event kind, delivered) for every notification that completed, oldest first.
        self.results: list[tuple[str, bool]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.command.strip())

    def notify(self, kind: str, **fields: Any) -> asyncio.Task[bool] | None:
        """Build the event (see :func:`make_event`) and send it in the background; None when disabled."""
        if not self.enabled:
            return None
        event = make_event(kind, **fields)
        task = asyncio.get_running_loop().create_task(self._run(event), name=f"notify-{kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, event: dict[str, Any]) -> bool:
        ok = await send(self.cfg, event, log=self.log)
        self.results.append((event["event"], ok))
        return ok

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Wait for notifications in flight (at most ``timeout_s``, default the command timeout + 5 s)."""
        if not self._tasks:
            return
        limit = timeout_s if timeout_s is not None else _timeout(self.cfg) + _REAP_TIMEOUT_S
        pending = set(self._tasks)
        _done, left = await asyncio.wait(pending, timeout=limit)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)


__all__ = ["EVENTS", "Notifier", "make_event", "send"]
