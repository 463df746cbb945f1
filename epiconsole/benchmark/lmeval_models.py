"""lm-eval models for the cluster. Imports lm_eval: only :mod:`epiconsole.benchmark.suite` loads this module.

``dllama-chat`` sends every ``generate_until`` request to dllama-api's chat completions as one user
message, honours the task's ``until`` stop strings and ``max_gen_toks``, counts prompt and completion
tokens from each response's ``usage`` and retries failed requests a bounded number of times. A failed
attempt is counted separately: the cluster spent energy on it, but its tokens are not part of N_tokens.
It cannot score loglikelihood (dllama-api has no logprobs).

``epi-local-completions`` is lm-eval's own ``local-completions`` (OpenAI-style completions with
logprobs, e.g. llama.cpp's server) plus the same usage counting, read from each parsed response.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.utils import hash_string

from drivers.dllama_api import ApiCancelled, ApiError, ApiUnavailable, SyncDllamaApi

#: Backoff between attempts of one request, in seconds (doubling, capped).
RETRY_BASE_S = 0.2
RETRY_MAX_S = 5.0


class RequestFailed(Exception):
    """A request still failed after every retry; the benchmark cannot finish."""


@dataclass
class TokenLedger:
    """Token and request counts of one benchmark run (thread-safe)."""

    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: prompt hash (lm-eval's sha256 of the context) -> (prompt_tokens, completion_tokens)
    per_prompt: dict[str, tuple[int, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def success(self, prompt_hash: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if prompt_hash is not None:
                self.per_prompt[prompt_hash] = (prompt_tokens, completion_tokens)

    def failure(self) -> None:
        with self._lock:
            self.requests += 1
            self.failed_requests += 1


LOGLIKELIHOOD_UNSUPPORTED = (
    "dllama-chat cannot score {what}: dllama-api returns no logprobs. Use a generative task variant "
    "(mmlu_generative, arc_challenge_chat, epi_hellaswag_gen, or a generate_until task of your own), or set "
    "benchmark.model = \"local-completions\" for a server that returns logprobs."
)


@register_model("dllama-chat")
class DllamaChatLM(LM):
    """Generative lm-eval model over dllama-api's chat completions."""

    def __init__(
        self,
        base_url: str | None = None,
        client: SyncDllamaApi | None = None,
        retries: int = 3,
        max_tokens: int = 16,
        timeout_s: float = 600.0,
        on_request: Callable[[int, int, TokenLedger], None] | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        if client is None:
            if not base_url:
                raise ValueError("dllama-chat needs base_url=http://HOST:PORT (the root node's dllama-api)")
            client = SyncDllamaApi.connect(str(base_url), float(timeout_s))
        self.client = client
        self.retries = int(retries)
        self.max_tokens = int(max_tokens)
        self.ledger = TokenLedger()
        self._on_request = on_request
        self._done = 0
        self._total = 0

    # lm-eval passes batch_size/device to every model; an HTTP client has no use for them.
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> DllamaChatLM:
        return cls(**arg_dict)

    @property
    def tokenizer_name(self) -> str:
        return "dllama-api"

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        raise NotImplementedError(LOGLIKELIHOOD_UNSUPPORTED.format(what="loglikelihood (multiple_choice tasks)"))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(LOGLIKELIHOOD_UNSUPPORTED.format(what="loglikelihood_rolling (perplexity tasks)"))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self._total += len(requests)
        out: list[str] = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.get("max_gen_toks") or self.max_tokens)
            text = self._complete(context, max_tokens, until)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _complete(self, context: str, max_tokens: int, until: list[str]) -> str:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(RETRY_BASE_S * 2 ** (attempt - 1), RETRY_MAX_S))
            try:
                res = self.client.chat([{"role": "user", "content": context}], max_tokens, until or None)
            except ApiCancelled:
                raise
            except ApiError as exc:
                if 400 <= exc.status < 500 and exc.status not in (408, 429):
                    raise RequestFailed(f"dllama-api rejected a request: {exc}") from None
                last = exc
            except ApiUnavailable as exc:
                last = exc
            else:
                self.ledger.success(hash_string(context), res.prompt_tokens, res.completion_tokens)
                self._progress()
                return res.text
            self.ledger.failure()
            self._progress()
        raise RequestFailed(f"a benchmark request failed {self.retries + 1} times in a row; last error: {last}")

    def _progress(self) -> None:
        if self._on_request is not None:
            self._done = self.ledger.requests - self.ledger.failed_requests
            self._on_request(self._done, self._total, self.ledger)


@register_model("epi-local-completions")
class CountingLocalCompletions(LocalCompletionsAPI):
    """lm-eval's ``local-completions`` that also adds up each response's ``usage``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = TokenLedger()

    def _count(self, outputs: Any) -> None:
        for out in outputs if isinstance(outputs, list) else [outputs]:
            usage = (out or {}).get("usage") or {}
            self.ledger.success(None, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    def parse_logprobs(self, outputs: Any, tokens: Any = None, ctxlens: Any = None, **kwargs: Any) -> list:
        self._count(outputs)
        return LocalCompletionsAPI.parse_logprobs(outputs, tokens, ctxlens, **kwargs)

    def parse_generations(self, outputs: Any, **kwargs: Any) -> list[str]:
        self._count(outputs)
        return LocalCompletionsAPI.parse_generations(outputs, **kwargs)


__all__ = ["CountingLocalCompletions", "DllamaChatLM", "RequestFailed", "TokenLedger"]
