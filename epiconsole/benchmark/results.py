"""Values the benchmark runner hands to the engine, the ledger and the CLI (no lm_eval import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskScore:
    """One task's score: ``acc`` is the task's configured metric (exact match for generative scoring)."""

    name: str  # the lm-eval task or group that ran
    acc: float
    stderr: float | None
    n: int
    metric: str  # the lm-eval metric read, e.g. "exact_match,get_response"
    weight: float
    shots: int
    version: str | None = None


@dataclass(frozen=True)
class SampleRecord:
    """One scored item, for the ledger."""

    task: str
    doc_id: int
    prompt_hash: str
    answer: str
    target: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Provenance:
    lm_eval_version: str
    model: str  # the lm-eval model: dllama-chat or local-completions
    api_url: str
    api_model_id: str
    tasks: dict[str, dict[str, Any]]  # name -> {version, shots, config_name}
    limit: int
    seed: int
    simulated: bool


@dataclass(frozen=True)
class BenchProgress:
    """Sent to ``on_progress`` after every request (successful or failed)."""

    done: int
    total: int
    failed_requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class BenchResult:
    tasks: dict[str, TaskScore]  # keyed by the configured task name
    composite: float
    prompt_tokens: int
    completion_tokens: int
    requests: int
    failed_requests: int
    duration_s: float
    provenance: Provenance
    samples: tuple[SampleRecord, ...] = field(default=(), repr=False)

    @property
    def simulated(self) -> bool:
        return self.provenance.simulated

    @property
    def lm_eval_version(self) -> str:
        return self.provenance.lm_eval_version

    def tokens(self, denominator: str = "all") -> int:
        """N_tokens for EPI under ``thresholds.token_denominator`` (all, prompt or completion)."""
        if denominator == "prompt":
            return self.prompt_tokens
        if denominator == "completion":
            return self.completion_tokens
        return self.prompt_tokens + self.completion_tokens

    def summary(self) -> dict[str, Any]:
        """The result as printed by ``epiconsole bench --json``."""
        return {
            "tasks": {k: {"acc": t.acc, "stderr": t.stderr, "n": t.n} for k, t in self.tasks.items()},
            "composite": self.composite,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "duration_s": self.duration_s,
            "lm_eval_version": self.lm_eval_version,
            "simulated": self.simulated,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, including provenance and per-sample records (for the ledger and exports)."""
        out = self.summary()
        out["task_details"] = {k: asdict(t) for k, t in self.tasks.items()}
        out["provenance"] = asdict(self.provenance)
        out["samples"] = [asdict(s) for s in self.samples]
        return out


def composite(scores: dict[str, TaskScore]) -> float:
    """Weighted mean of task accuracies (weights need not sum to 1)."""
    total = sum(s.weight for s in scores.values())
    if total <= 0:
        return 0.0
    return sum(s.acc * s.weight for s in scores.values()) / total


__all__ = ["BenchProgress", "BenchResult", "Provenance", "SampleRecord", "TaskScore", "composite"]
