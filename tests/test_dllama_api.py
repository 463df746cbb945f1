"""The dllama-api client against real HTTP servers on loopback: the simulated API and small probes."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from drivers.dllama_api import (
    ApiCancelled,
    ApiError,
    ApiUnavailable,
    ChatResult,
    DllamaApi,
    SyncDllamaApi,
    truncate_at_stop,
)
from epiconsole.benchmark.localdata import items
from epiconsole.sim.api import SimApi
from tests.bench_fixtures import free_port, lab_fixture, make_lab, set_accuracy, sim_api_fixture  # noqa: F401  (fixtures)


class Probe:
    """A tiny server that records how many requests it handles at once and answers after ``delay``."""

    def __init__(self, delay: float = 0.1, status: int = 200, body: str | None = None) -> None:
        self.delay, self.status, self.body = delay, status, body
        self.in_flight = self.max_in_flight = self.count = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handler(self, request: web.Request) -> web.Response:
        self.count += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.body is not None:
            return web.Response(status=self.status, text=self.body)
        return web.json_response({"choices": [{"message": {"content": "ok"}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}, "model": "probe",
                                  "data": [{"id": "probe"}]},
                                 status=self.status)

    async def __aenter__(self) -> Probe:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handler)
        app.router.add_get("/v1/models", self.handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


MSG = [{"role": "user", "content": "hello"}]


async def test_models_and_chat_against_the_simulated_api(sim_api, lab):
    set_accuracy(lab, 1.0)
    item = items("epi_mmlu_local")[0]
    prompt = ("The following are multiple choice questions (with answers) about x.\n\n" + item.question + "\n"
              + "\n".join(f"{x}. {o}" for x, o in zip("ABCD", item.options, strict=False)) + "\nAnswer:")
    async with DllamaApi(sim_api.url, timeout_s=5) as api:
        assert await api.models() == ["dllama_model_baseline_q40"]
        res = await api.chat([{"role": "user", "content": prompt}], max_tokens=16, stop=["\n"])
    assert isinstance(res, ChatResult)
    assert res.text == f" {item.answer}"
    assert res.model == "dllama_model_baseline_q40"
    assert (res.prompt_tokens, res.completion_tokens) == (sim_api.tally.prompt_tokens, sim_api.tally.completion_tokens)
    assert res.latency_s > 0


async def test_stop_strings_are_applied_even_when_the_server_ignores_them():
    assert truncate_at_stop("B. Paris\nmore", ["\n", "."]) == "B"
    assert truncate_at_stop("no stop here", ["\n\n"]) == "no stop here"
    assert truncate_at_stop("x", None) == "x"
    body = '{"choices":[{"message":{"content":"A\\nwhy"}}],"usage":{"prompt_tokens":5,"completion_tokens":3}}'
    async with Probe(delay=0, body=body) as probe, DllamaApi(probe.url, timeout_s=5) as api:
        res = await api.chat(MSG, 8, stop=["\n"])
    assert res.text == "A" and res.completion_tokens == 3


async def test_unreachable_api_is_one_sentence():
    async with DllamaApi(f"http://127.0.0.1:{free_port()}", timeout_s=5) as api:
        with pytest.raises(ApiUnavailable) as info:
            await api.models()
    msg = str(info.value)
    assert "cannot connect to dllama-api" in msg and "api_port" in msg and "\n" not in msg


async def test_slow_answer_times_out():
    slow = make_lab(api_delay_s=2.0)
    api_server = SimApi(slow)
    await api_server.start(0)
    try:
        async with DllamaApi(api_server.url, timeout_s=0.3) as api:
            t0 = time.monotonic()
            with pytest.raises(ApiUnavailable, match="did not answer within 0.3 s"):
                await api.chat(MSG, 4)
            assert time.monotonic() - t0 < 1.8  # our timeout, not the server's answer, ended it
    finally:
        await api_server.stop()


async def test_error_statuses_become_api_errors(sim_api, lab):
    async with DllamaApi(sim_api.url + "/nope", timeout_s=5) as api:
        with pytest.raises(ApiError) as info:
            await api.models()
        assert info.value.status == 404
    lab.deployed = None
    async with DllamaApi(sim_api.url, timeout_s=5) as api:
        with pytest.raises(ApiError) as info:
            await api.chat(MSG, 4)
    assert info.value.status == 503 and "no model is loaded" in str(info.value)


async def test_unreadable_answers_become_api_errors():
    async with Probe(delay=0, body="<html>busy</html>") as probe, DllamaApi(probe.url, timeout_s=5) as api:
        with pytest.raises(ApiError, match="not JSON"):
            await api.chat(MSG, 4)
    async with Probe(delay=0, body='{"choices": []}') as probe, DllamaApi(probe.url, timeout_s=5) as api:
        with pytest.raises(ApiError, match="lacks choices"):
            await api.chat(MSG, 4)


async def test_one_request_in_flight():
    async with Probe(delay=0.1) as probe, DllamaApi(probe.url, timeout_s=5) as api:
        t0 = time.monotonic()
        results = await asyncio.gather(*(api.chat(MSG, 4) for _ in range(4)), api.models())
        assert len(results) == 5
        assert probe.count == 5 and probe.max_in_flight == 1
        assert time.monotonic() - t0 >= 0.45


async def test_waiting_for_the_lock_has_a_timeout():
    # Each answer takes 1 s, well inside the 1.6 s timeout; the third request waits 2 s for the lock.
    async with Probe(delay=1.0) as probe, DllamaApi(probe.url, timeout_s=1.6) as api:
        results = await asyncio.gather(*(api.chat(MSG, 4) for _ in range(3)), return_exceptions=True)
    assert isinstance(results[0], ChatResult)
    assert isinstance(results[-1], ApiUnavailable) and "stayed busy" in str(results[-1])


async def test_sync_wrapper_on_the_callers_loop_shares_the_lock():
    async with Probe(delay=0.1) as probe:
        api = DllamaApi(probe.url, timeout_s=5)
        sync = SyncDllamaApi(api, asyncio.get_running_loop())
        try:
            # A blocking caller (lm-eval's thread) and an async caller at once: still one at a time.
            out = await asyncio.gather(asyncio.to_thread(sync.chat, MSG, 4), api.chat(MSG, 4),
                                       asyncio.to_thread(sync.models))
            assert out[0].text == "ok" and probe.max_in_flight == 1
            sync.close()  # not its loop: a no-op
            assert not sync.owns_loop
        finally:
            await api.close()


def test_sync_wrapper_on_a_private_loop():
    lab_ = make_lab()
    srv = SimApi(lab_)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(srv.start(0))
        import threading

        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        sync = SyncDllamaApi.connect(srv.url, timeout_s=5)
        assert sync.owns_loop
        assert sync.models() == ["dllama_model_baseline_q40"]
        assert sync.chat(MSG, 4).prompt_tokens > 0
        sync.close()
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
    finally:
        loop.run_until_complete(srv.stop())
        loop.close()


async def test_cancel_aborts_the_request_in_flight_and_refuses_more():
    async with Probe(delay=2.0) as probe:
        api = DllamaApi(probe.url, timeout_s=5)
        sync = SyncDllamaApi(api, asyncio.get_running_loop())
        try:
            call = asyncio.ensure_future(asyncio.to_thread(sync.chat, MSG, 4))
            async with asyncio.timeout(10):
                while probe.count == 0:  # the request is in flight
                    await asyncio.sleep(0.01)
            sync.cancel()
            # Had the request run to its end, the call would have returned the answer instead.
            with pytest.raises(ApiCancelled):
                await asyncio.wait_for(call, 10)
            with pytest.raises(ApiCancelled):
                await asyncio.to_thread(sync.models)
        finally:
            await api.close()
