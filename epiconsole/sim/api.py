"""The simulated root node's ``dllama-api``: an HTTP server on 127.0.0.1 that behaves like the real one.

Like distributed-llama's API it has only ``GET /v1/models`` and non-streaming ``POST
/v1/chat/completions`` (anything else is 404, ``stream: true`` is 400, logprobs are never returned),
serves one request at a time, and reports ``usage`` token counts. While it answers, the whole simulated
cluster is busy for the virtual time the physics model gives (``SimLab.inference``), which is what the
simulated meter sees as load.

Tokenizer (for usage counts): the text is split into words and punctuation marks (``\\w+|[^\\w\\s]``); a
word counts one token per started 4 characters, a mark one token. Each chat message adds 4 tokens of
template (role markers) and the prompt 3 more for the assistant header, roughly what Qwen3's chat template
adds. Completion tokens are those of the returned text plus 1 for the end-of-turn/stop token.

Answers: the task is recognised from the prompt's wording, which our task YAMLs and lm-eval's generative
variants share: ``multiple choice questions (with answers) about`` -> mmlu, ``Given the following question
and four candidate answers`` -> arc_challenge, ``most plausible continuation`` -> hellaswag; anything else
counts as an unknown task (``Physics.accuracy``'s default). The question asked is the last run of options
labelled ``A.``/``A)`` ... in the prompt; the simulated model "knows" the right answer of the items in our
local task files (``epiconsole.benchmark.localdata``) and answers correctly with probability
``lab.physics.accuracy(task, lab.deployed)``, else with a wrong option. The draw comes from a RNG seeded
with (lab seed, prompt hash), so a prompt always gets the same answer (a retried request too), and a
smaller accuracy only ever turns right answers wrong. Items it does not know (public datasets) it answers
at chance. The answer is the bare letter followed by a justification on the next line, so the task's stop
strings end it where a well-behaved model's answer ends.

Faults: ``lab.faults.api_fail_fraction`` answers that fraction of chat requests with HTTP 500 (after the
prompt was processed, so the energy is spent), drawn from a RNG seeded with the lab seed and the request
number; ``api_delay_s`` adds that many real (wall-clock) seconds to every chat request.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from drivers.dllama_api import truncate_at_stop
from epiconsole.benchmark.localdata import LETTERS, answer_key, options_key
from epiconsole.sim.state import SimLab

_WORD = re.compile(r"\w+|[^\w\s]")
_OPTION = re.compile(r"^\s*([A-E])[.)]\s+(.*?)\s*$")
MESSAGE_OVERHEAD_TOKENS = 4
PROMPT_OVERHEAD_TOKENS = 3

#: Prompt wording -> task family (see the module docstring).
TASK_MARKERS: tuple[tuple[str, str], ...] = (
    ("multiple choice questions (with answers) about", "mmlu"),
    ("given the following question and four candidate answers", "arc_challenge"),
    ("most plausible continuation", "hellaswag"),
)


def count_tokens(text: str) -> int:
    """Token count of the simulated tokenizer (see the module docstring)."""
    return sum(math.ceil(len(w) / 4) for w in _WORD.findall(text))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return PROMPT_OVERHEAD_TOKENS + sum(
        MESSAGE_OVERHEAD_TOKENS + count_tokens(str(m.get("content") or "")) for m in messages
    )


def classify(prompt: str) -> str | None:
    """The task family a prompt belongs to, from its wording; None when unrecognised."""
    low = prompt.lower()
    for marker, family in TASK_MARKERS:
        if marker in low:
            return family
    return None


def last_options(prompt: str) -> list[tuple[str, str]]:
    """The last run of consecutively lettered options (A, B, C, ...) in the prompt."""
    # lm-eval's arc_challenge_chat YAML writes its line breaks as a literal backslash-n; read both.
    lines = prompt.replace("\\n", "\n").splitlines()
    last: list[tuple[str, str]] = []
    run: list[tuple[str, str]] = []
    for line in lines:
        m = _OPTION.match(line)
        if m and m.group(1) == LETTERS[len(run)]:
            run.append((m.group(1), m.group(2)))
            continue
        if len(run) >= 2:
            last = run
        run = []
        if m and m.group(1) == "A":
            run = [(m.group(1), m.group(2))]
    if len(run) >= 2:
        last = run
    return last


@dataclass
class ApiTally:
    """What the simulated API served: for tests to compare against the client's own counts."""

    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    correct: int = 0
    known: int = 0


class SimApi:
    """The simulated ``dllama-api`` of one :class:`SimLab`."""

    def __init__(self, lab: SimLab) -> None:
        self.lab = lab
        self.tally = ApiTally()
        self._lock = asyncio.Lock()
        self._fail_rng = random.Random(f"api-fail:{lab.physics.seed}")
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def model_id(self) -> str | None:
        d = self.lab.deployed
        return None if d is None else f"dllama_model_{d.config_id}_q40"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the simulated API is not started")
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> int:
        """Serve on 127.0.0.1:``port`` (0 picks a free port); returns the port."""
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server  # aiohttp keeps the bound socket here; the public API has no getter
        self.port = int(server.sockets[0].getsockname()[1]) if server and server.sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- routes ----------------------------------------------------------------------------------

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, f"{request.method} {request.path} is not an endpoint of dllama-api")

    async def _models(self, request: web.Request) -> web.Response:
        model = self.model_id
        if model is None:
            return _error(503, "no model is loaded")
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "user", "simulated": True},
        ]})

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages must be a non-empty array")
        if body.get("stream"):
            return _error(400, "streaming is not supported by this server")
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        max_tokens = body.get("max_tokens")
        max_tokens = int(max_tokens) if isinstance(max_tokens, int) and max_tokens > 0 else 256
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]

        async with self._lock:  # the real server handles one request at a time; others queue
            deployed = self.lab.deployed
            if deployed is None:
                return _error(503, "no model is loaded")
            self.tally.requests += 1
            n_prompt = prompt_tokens(messages)
            if self.lab.faults.api_delay_s > 0:
                await asyncio.sleep(self.lab.faults.api_delay_s)
            if self._fail_rng.random() < self.lab.faults.api_fail_fraction:
                async with self.lab.inference(n_prompt, 0):
                    pass
                self.tally.failed += 1
                return _error(500, "inference failed (simulated fault)")
            prompt = "\n".join(str(m.get("content") or "") for m in messages)
            text = self._answer(prompt)
            text = _truncate_tokens(truncate_at_stop(text, stop), max_tokens)
            n_completion = count_tokens(text) + 1
            async with self.lab.inference(n_prompt, n_completion):
                pass
            self.tally.prompt_tokens += n_prompt
            self.tally.completion_tokens += n_completion
            n = self.tally.requests
        return web.json_response({
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion},
        })

    # -- the simulated model ---------------------------------------------------------------------

    def _answer(self, prompt: str) -> str:
        options = last_options(prompt)
        if not options:
            return "This is a simulated answer from the simulated lab."
        letters = [letter for letter, _ in options]
        family = classify(prompt) or "unknown"
        rng = random.Random(f"{self.lab.physics.seed}:{hashlib.sha256(prompt.encode()).hexdigest()}")
        u = rng.random()
        item = answer_key().get(options_key([text for _, text in options]))
        if item is None or item.answer not in letters:
            letter = rng.choice(letters)
        else:
            self.tally.known += 1
            if u < self.lab.physics.accuracy(family, self.lab.deployed):
                letter = item.answer
                self.tally.correct += 1
            else:
                letter = rng.choice([x for x in letters if x != item.answer])
        chosen = dict(options)[letter]
        if prompt.rstrip().endswith("The best answer is"):
            return f" {letter}.\n\n{chosen} fits the question best."
        return f" {letter}\n{chosen} is the best answer."


def _truncate_tokens(text: str, max_tokens: int) -> str:
    """Keep whole words/marks while the token budget lasts (the server stops generating at max_tokens)."""
    used = 0
    end = 0
    for m in _WORD.finditer(text):
        cost = math.ceil(len(m.group()) / 4)
        if used + cost > max_tokens:
            return text[:end]
        used += cost
        end = m.end()
    return text


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


__all__ = ["ApiTally", "SimApi", "classify", "count_tokens", "last_options", "prompt_tokens"]
