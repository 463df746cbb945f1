"""Lab commands from viewers: what needs a confirmation, what a view-only viewer may not do, and
sending a command through the ledger to the lab service (the only process that acts on it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epiconsole.live import COMMANDS
from screens.controllers.source import DataSource

#: Verbs that lose work or disturb a measurement: the console asks before sending them.
DESTRUCTIVE = frozenset({"abort", "skip", "retry", "set_governor", "restart_worker", "restart_root"})
#: How long the console waits for the service to acknowledge a command before saying so.
ACK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CommandRequest:
    verb: str
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def destructive(self) -> bool:
        return self.verb in DESTRUCTIVE

    def describe(self) -> str:
        """The question a confirmation dialog asks."""
        a = dict(self.args)
        texts = {
            "abort": "Abort the campaign? The current measurement is discarded and the run ends as aborted.",
            "skip": f"Skip configuration {a.get('config_id', '?')}? Its remaining repetitions will not run.",
            "retry": f"Run configuration {a.get('config_id', '?')} again? Its failed or invalid repetitions are redone.",
            "set_governor": f"Set the cpufreq governor of {a.get('node', '?')} to {a.get('governor', '?')}?",
            "restart_worker": f"Restart the dllama worker on {a.get('node', '?')}? A running benchmark is interrupted.",
            "restart_root": "Restart the root node's dllama-api? A running benchmark is interrupted.",
        }
        return texts.get(self.verb, f"Send '{self.verb}' to the lab service?")


@dataclass(frozen=True)
class CommandOutcome:
    ok: bool | None
    message: str


class Commander:
    """Sends :class:`CommandRequest` s for a viewer; refuses them all when the viewer is view-only."""

    def __init__(self, source: DataSource, *, allow_control: bool = True, ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        self.source = source
        self.allow_control = allow_control
        self.ack_timeout_s = ack_timeout_s

    def refusal(self, req: CommandRequest) -> str | None:
        """Why ``req`` cannot be sent from this viewer, or None."""
        if req.verb not in COMMANDS:
            return f"'{req.verb}' is not a lab command."
        if not self.allow_control:
            return "This viewer is view-only: run lab commands from the console, or set [web] allow_control = true."
        return None

    async def send(self, req: CommandRequest) -> CommandOutcome:
        """Queue the command and wait (bounded) for the service's answer."""
        refused = self.refusal(req)
        if refused:
            return CommandOutcome(False, refused)
        cid = await self.source.send(req.verb, dict(req.args))
        done = await self.source.wait_command(cid, self.ack_timeout_s)
        if done is None:
            return CommandOutcome(None, f"'{req.verb}' is queued; the lab service has not answered yet.")
        detail = done.result if isinstance(done.result, str) else ""
        if isinstance(done.result, Mapping):
            detail = str(done.result.get("message") or done.result.get("error") or "")
        if done.ok:
            return CommandOutcome(True, f"{req.verb}: done" + (f" — {detail}" if detail else ""))
        return CommandOutcome(False, f"{req.verb} refused by the lab service" + (f": {detail}" if detail else ""))
