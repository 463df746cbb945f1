"""Client for distributed-llama's ``dllama-api`` on the cluster's root node.

dllama-api offers exactly two routes, ``GET /v1/models`` and ``POST /v1/chat/completions``, and serves one
request at a time. The non-streaming chat response carries ``usage{prompt_tokens, completion_tokens}``;
there are no logprobs. This module speaks only that subset.

:class:`DllamaApi` is the asyncio client (aiohttp). :class:`SyncDllamaApi` gives blocking callers — lm-eval
calls ``generate_until`` synchronously from its own thread — the same client: it submits each call to an
event loop with ``asyncio.run_coroutine_threadsafe`` and waits with a timeout. Given the caller's loop (the
lab service's, where the benchmark runner lives) it shares that loop's client, lock and connection pool,
so a health probe and a benchmark request never reach the one-at-a-time server together; given none, it
owns a private loop thread (for lm-eval used on its own). A blocking HTTP library in lm-eval's thread would
have been simpler but would bypass the one-in-flight lock and need a second set of timeouts and errors.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")

#: How much of an error body goes into a message (bodies can be whole HTML pages).
_BODY_SHOWN = 200


class ApiUnavailable(Exception):
    """The API cannot be reached or did not answer in time (a lab condition, not a bug)."""


class ApiError(Exception):
    """The API answered with an error status or a response we cannot read."""

    def __init__(self, status: int, body: str, message: str | None = None) -> None:
        self.status = status
        self.body = body
        shown = body.strip().replace("\n", " ")[:_BODY_SHOWN]
        super().__init__(message or f"dllama-api answered HTTP {status}: {shown or '(empty body)'}")


class ApiCancelled(Exception):
    """The synchronous wrapper was cancelled by its owner; no further requests are sent."""


@dataclass(frozen=True)
class ChatResult:
    """One completed chat request, with the server's own token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    model: str
    finish_reason: str | None = None


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut ``text`` before the first occurrence of any stop string (servers may ignore ``stop``)."""
    cut = len(text)
    for s in stop or ():
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


class DllamaApi:
    """Async client for one dllama-api endpoint; one request in flight at a time."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, connect_timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self._session: aiohttp.ClientSession | None = None
        # dllama-api serves one request at a time; queueing here keeps our own timeouts honest
        # (a request waiting in the server's accept queue would look like a slow answer).
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> DllamaApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def models(self) -> list[str]:
        """The model ids the server reports (dllama-api reports the one it serves)."""
        status, body = await self._request("GET", "/v1/models", None)
        data = _json_or_error(status, body)
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError) as exc:
            raise ApiError(status, body, f"dllama-api's /v1/models answer has no data[].id ({exc!r})") from None

    async def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int,
        stop: Sequence[str] | None = None,
    ) -> ChatResult:
        """One non-streaming chat completion. The text is cut at the first stop string."""
        payload: dict[str, Any] = {"messages": [dict(m) for m in messages], "max_tokens": int(max_tokens),
                                   "stream": False}
        if stop:
            payload["stop"] = list(stop)
        t0 = time.monotonic()
        status, body = await self._request("POST", "/v1/chat/completions", payload)
        latency = time.monotonic() - t0
        data = _json_or_error(status, body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            usage = data["usage"]
            prompt_tokens = int(usage["prompt_tokens"])
            completion_tokens = int(usage["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ApiError(status, body, f"dllama-api's chat answer lacks choices[0].message or usage ({exc!r})") from None
        return ChatResult(
            text=truncate_at_stop(str(text), stop),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency,
            model=str(data.get("model", "")),
            finish_reason=choice.get("finish_reason"),
        )

    async def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> tuple[int, str]:
        url = self.base_url + path
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._lock.acquire()
        except TimeoutError:
            raise ApiUnavailable(
                f"dllama-api at {self.base_url} stayed busy with another request for {self.timeout_s:g} s; "
                "wait for it to finish or raise cluster.api_timeout_s"
            ) from None
        try:
            session = self._get_session()
            async with session.request(method, url, json=payload) as resp:
                body = await resp.text(errors="replace")
                return resp.status, body
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise ApiUnavailable(
                f"dllama-api at {self.base_url} did not answer within {self.timeout_s:g} s; "
                "check the root node's /tmp/dllama-api.log or raise cluster.api_timeout_s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise ApiUnavailable(
                f"cannot connect to dllama-api at {self.base_url} ({exc.os_error or exc}); "
                "start it on the root node or fix cluster.api_host/api_port"
            ) from None
        except aiohttp.ClientError as exc:
            raise ApiUnavailable(
                f"the connection to dllama-api at {self.base_url} failed ({exc.__class__.__name__}: {exc}); "
                "check that the root node is up"
            ) from None
        finally:
            self._lock.release()


def _json_or_error(status: int, body: str) -> Any:
    import json

    if status >= 400:
        raise ApiError(status, body)
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(status, body, f"dllama-api answered HTTP {status} with a body that is not JSON") from None


class SyncDllamaApi:
    """Blocking face of :class:`DllamaApi` for code that runs outside the event loop (lm-eval's thread).

    Never call it from the loop's own thread: it would wait on itself.
    """

    def __init__(self, api: DllamaApi, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.api = api
        self._thread: threading.Thread | None = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="dllama-api-client", daemon=True)
            self._thread.start()
        self.loop = loop
        self._cancelled = threading.Event()
        self._pending: set[asyncio.Future[Any]] = set()
        self._pending_lock = threading.Lock()

    @classmethod
    def connect(cls, base_url: str, timeout_s: float = 600.0) -> SyncDllamaApi:
        """A client on a private loop thread (closed by :meth:`close`)."""
        return cls(DllamaApi(base_url, timeout_s))

    @property
    def owns_loop(self) -> bool:
        return self._thread is not None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._cancelled.is_set():
            coro.close()
            raise ApiCancelled("the benchmark was cancelled")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._pending_lock:
            self._pending.add(fut)  # type: ignore[arg-type]
        try:
            # The client's own timeouts fire first (lock wait + request); this bound only guards a stuck loop.
            return fut.result(timeout=2 * self.api.timeout_s + 5)
        except TimeoutError:
            fut.cancel()
            raise ApiUnavailable(f"dllama-api at {self.api.base_url} did not answer in time") from None
        except Exception as exc:
            if fut.cancelled() or isinstance(exc, asyncio.CancelledError):
                raise ApiCancelled("the benchmark was cancelled") from None
            raise
        finally:
            with self._pending_lock:
                self._pending.discard(fut)  # type: ignore[arg-type]

    def models(self) -> list[str]:
        return self._call(self.api.models())

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int,
             stop: Sequence[str] | None = None) -> ChatResult:
        return self._call(self.api.chat(messages, max_tokens, stop))

    def cancel(self) -> None:
        """Thread-safe: abort the request in flight and refuse further ones."""
        self._cancelled.set()
        with self._pending_lock:
            for fut in list(self._pending):
                fut.cancel()

    def close(self) -> None:
        """Close the client if this wrapper owns its loop (otherwise the loop's owner closes ``api``)."""
        if self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.api.close(), self.loop).result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()
            self._thread = None


__all__ = ["ApiCancelled", "ApiError", "ApiUnavailable", "ChatResult", "DllamaApi", "SyncDllamaApi", "truncate_at_stop"]
