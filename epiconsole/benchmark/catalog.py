"""Which lm-eval tasks and which lm-eval model a benchmark config means (no lm_eval import).

dllama-api has no logprobs, so on the cluster every task is scored generatively: the model writes the
answer letter. The configured families map to lm-eval's generative variants where they exist
(``mmlu_generative``, ``arc_challenge_chat``) and to ours where they do not (``epi_hellaswag_gen``). With
``benchmark.model = "local-completions"`` (an OpenAI-style completions server with logprobs, such as
llama.cpp's) the families keep lm-eval's standard loglikelihood tasks. The simulated lab answers from our
local items only, so on it the families map to ``epi_*_local`` with few-shot capped to keep prompts short.
Any other name is passed to lm-eval unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epiconsole.config import BenchmarkConfig

MODELS = ("dllama-chat", "local-completions")

GENERATIVE = {"mmlu": "mmlu_generative", "arc_challenge": "arc_challenge_chat", "hellaswag": "epi_hellaswag_gen"}
LOGLIKELIHOOD = {"mmlu": "mmlu", "arc_challenge": "arc_challenge", "hellaswag": "hellaswag"}
LOCAL = {"mmlu": "epi_mmlu_local", "arc_challenge": "epi_arc_local", "hellaswag": "epi_hellaswag_local"}
#: Few-shot cap on the simulated lab's local tasks (each extra shot is another ~60 prompt tokens).
SIM_MAX_SHOTS = 2


@dataclass(frozen=True)
class PlannedTask:
    key: str  # the name in the config, used as the result key
    lm_eval_name: str
    shots: int
    metric: str
    weight: float


@dataclass(frozen=True)
class ModelSpec:
    """The lm-eval model to run: our registered ``dllama-chat`` or a counting ``local-completions``."""

    name: str  # lm-eval registry name
    args: dict[str, Any]


def plan_tasks(bench: BenchmarkConfig, *, simulated: bool) -> list[PlannedTask]:
    out = []
    for t in bench.tasks:
        if simulated and t.name in LOCAL:
            name, shots = LOCAL[t.name], min(t.shots, SIM_MAX_SHOTS)
        elif bench.model == "local-completions":
            name, shots = LOGLIKELIHOOD.get(t.name, t.name), t.shots
        else:
            name, shots = GENERATIVE.get(t.name, t.name), t.shots
        out.append(PlannedTask(t.name, name, shots, t.metric, t.weight))
    return out


def model_spec(bench: BenchmarkConfig, api_url: str, model_id: str, timeout_s: float) -> ModelSpec:
    """The lm-eval model for ``benchmark.model``; UserError-worthy names are rejected by the caller."""
    base = api_url.rstrip("/")
    if bench.model == "dllama-chat":
        return ModelSpec("dllama-chat", {"base_url": base, "retries": bench.retries,
                                         "max_tokens": bench.max_tokens, "timeout_s": timeout_s})
    if bench.model == "local-completions":
        # lm-eval's own client (requests + its tenacity retries); our subclass only adds usage counting.
        # tokenizer_backend stays lm-eval's "auto": the server's /tokenize if it has one, else the HF
        # tokenizer named by the model id the server reports.
        return ModelSpec("epi-local-completions", {
            "base_url": f"{base}/v1/completions", "model": model_id, "num_concurrent": 1,
            "max_retries": bench.retries + 1, "timeout": int(timeout_s), "max_gen_toks": bench.max_tokens,
            "seed": bench.seed,
        })
    raise ValueError(bench.model)


__all__ = ["GENERATIVE", "LOCAL", "LOGLIKELIHOOD", "MODELS", "ModelSpec", "PlannedTask", "SIM_MAX_SHOTS",
           "model_spec", "plan_tasks"]
