"""The simulated dllama-api over real HTTP on loopback: routes, usage counts, answers, faults, one at a time."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from epiconsole.benchmark.localdata import answer_key, items
from epiconsole.sim.api import SimApi, classify, count_tokens, last_options, prompt_tokens
from epiconsole.sim.physics import Deployed
from tests.bench_fixtures import lab_fixture, make_lab, set_accuracy, sim_api_fixture  # noqa: F401  (fixtures)


def mmlu_prompt(item, shots=()) -> str:
    def block(it, answer=""):
        opts = "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", it.options, strict=False))
        return f"{it.question}\n{opts}\nAnswer:{answer}"

    parts = [block(s, " " + s.answer) for s in shots] + [block(item)]
    return "The following are multiple choice questions (with answers) about science.\n\n" + "\n\n".join(parts)


async def post(api: SimApi, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(f"{api.url}/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


def chat(content: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 16, **extra}


async def test_models_reports_the_deployed_model(sim_api, lab):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sim_api.url}/v1/models") as r:
            assert r.status == 200
            data = await r.json()
        assert [m["id"] for m in data["data"]] == ["dllama_model_baseline_q40"]
        lab.deployed = Deployed("drop3_all", experts=3, target="all", strategy="remove")
        async with s.get(f"{sim_api.url}/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "dllama_model_drop3_all_q40"
        lab.deployed = None
        async with s.get(f"{sim_api.url}/v1/models") as r:
            assert r.status == 503


async def test_only_the_two_routes_exist(sim_api):
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/v1/completions"), ("POST", "/v1/completions"), ("GET", "/"),
                             ("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("GET", "/health")):
            async with s.request(method, sim_api.url + path) as r:
                assert r.status == 404, (method, path)


async def test_streaming_is_refused_and_logprobs_never_returned(sim_api):
    status, body = await post(sim_api, chat("hello", stream=True))
    assert status == 400 and "stream" in body["error"]["message"]
    status, body = await post(sim_api, chat("hello", logprobs=True, top_logprobs=5))
    assert status == 200
    assert "logprobs" not in body["choices"][0]
    assert sim_api.tally.requests == 1  # the refused stream never reached the model


async def test_bad_bodies_are_400(sim_api):
    async with aiohttp.ClientSession() as s, s.post(f"{sim_api.url}/v1/chat/completions", data=b"{not json") as r:
        assert r.status == 400
    status, _ = await post(sim_api, {"messages": []})
    assert status == 400


async def test_no_model_loaded_is_503(sim_api, lab):
    lab.deployed = None
    status, body = await post(sim_api, chat("hi"))
    assert status == 503 and "no model" in body["error"]["message"]


async def test_usage_follows_the_documented_tokenizer_and_the_tally_adds_up(sim_api):
    prompts = ["Hello there, cluster!", "x" * 17, mmlu_prompt(items("epi_mmlu_local")[0])]
    total_p = total_c = 0
    for p in prompts:
        status, body = await post(sim_api, chat(p))
        assert status == 200
        u = body["usage"]
        assert u["prompt_tokens"] == prompt_tokens([{"role": "user", "content": p}])
        assert u["completion_tokens"] == count_tokens(body["choices"][0]["message"]["content"]) + 1
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        total_p += u["prompt_tokens"]
        total_c += u["completion_tokens"]
    assert (sim_api.tally.prompt_tokens, sim_api.tally.completion_tokens) == (total_p, total_c)
    assert count_tokens("Hello there, cluster!") == 2 + 2 + 1 + 2 + 1  # hell|o, ther|e, ",", clus|ter, "!"
    assert prompt_tokens([{"role": "user", "content": "x" * 17}]) == 3 + 4 + 5


async def test_answers_right_at_accuracy_one_and_wrong_at_zero(sim_api, lab):
    mmlu = items("epi_mmlu_local")
    set_accuracy(lab, 1.0)
    for it in mmlu[:8]:
        _, body = await post(sim_api, chat(mmlu_prompt(it, shots=mmlu[-2:]), stop=["\n"]))
        assert body["choices"][0]["message"]["content"].strip() == it.answer
    set_accuracy(lab, 0.0)
    for it in mmlu[:8]:
        _, body = await post(sim_api, chat(mmlu_prompt(it)))
        text = body["choices"][0]["message"]["content"]
        assert text.split("\n")[0].strip() in "ABCD" and text.split("\n")[0].strip() != it.answer


async def test_stop_strings_and_max_tokens_are_honoured(sim_api, lab):
    set_accuracy(lab, 1.0)
    it = items("epi_mmlu_local")[3]
    _, full = await post(sim_api, chat(mmlu_prompt(it)))
    text = full["choices"][0]["message"]["content"]
    assert "\n" in text and text.strip().startswith(it.answer)  # a justification follows the letter
    _, cut = await post(sim_api, chat(mmlu_prompt(it), stop=["\n"]))
    assert cut["choices"][0]["message"]["content"] == f" {it.answer}"
    assert cut["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    _, short = await post(sim_api, chat(mmlu_prompt(it), max_tokens=1))
    assert short["choices"][0]["message"]["content"] == f" {it.answer}"


async def test_the_same_prompt_gets_the_same_answer(sim_api):
    it = items("epi_hellaswag_local")[5]
    prompt = ("Choose the most plausible continuation of each description (with answers).\n\n" + it.question + "\n"
              + "\n".join(f"{x}. {o}" for x, o in zip("ABCD", it.options, strict=False)) + "\nAnswer:")
    answers = {(await post(sim_api, chat(prompt)))[1]["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(answers) == 1


async def test_observed_accuracy_tracks_the_physics_model():
    # Over every local item and a handful of seeds, the share answered correctly matches Physics.accuracy.
    keyed = list(answer_key().values())
    for deployed in (Deployed("baseline"), Deployed("drop8_all", experts=8, target="all", strategy="zero")):
        right = total = 0
        expected = 0.0
        for seed in range(4):
            lab = make_lab(seed=seed, deployed=deployed)
            api = SimApi(lab)
            for it in keyed:
                task = {"mmlu": "mmlu", "arc_challenge": "arc_challenge", "hellaswag": "hellaswag"}[it.family]
                prompt = mmlu_prompt(it) if it.family == "mmlu" else (
                    "Given the following question and four candidate answers (A, B, C and D), choose the best "
                    f"answer.\\nQuestion: {it.question}\\n"
                    + "\\n".join(f"{x}. {o}" for x, o in zip("ABCD", it.options, strict=False))
                    + "\\nYour response should end with ... The best answer is"
                    if it.family == "arc_challenge" else
                    f"Choose the most plausible continuation of each description.\n\n{it.question}\n"
                    + "\n".join(f"{x}. {o}" for x, o in zip("ABCD", it.options, strict=False)) + "\nAnswer:")
                text = api._answer(prompt)
                right += text.strip()[0] == it.answer
                total += 1
                expected += lab.physics.accuracy(task, deployed)
        p = expected / total
        se = (p * (1 - p) / total) ** 0.5
        assert abs(right / total - p) < 3 * se, (deployed, right / total, p)


def test_prompt_parsing():
    arc = ("Given the following question and four candidate answers (A, B, C and D), choose the best answer."
           "\\nQuestion: Q1\\nA. one\\nB. two\\nC. three\\nD. four\\nYour response ... The best answer is B\n\n"
           "Given the following question and four candidate answers (A, B, C and D), choose the best answer."
           "\\nQuestion: Q2\\nA. red\\nB. green\\nC. blue\\nYour response ... The best answer is")
    assert classify(arc) == "arc_challenge"
    assert last_options(arc) == [("A", "red"), ("B", "green"), ("C", "blue")]
    paren = "Pick one.\nA) cat\nB) dog\nAnswer:"
    assert last_options(paren) == [("A", "cat"), ("B", "dog")]
    assert classify(paren) is None
    assert last_options("A. only one option\nAnswer:") == []
    assert classify("The following are multiple choice questions (with answers) about x.") == "mmlu"


async def test_fail_fraction_gives_500s_that_spend_energy_but_count_no_tokens():
    lab = make_lab(api_fail_fraction=1.0)
    api = SimApi(lab)
    await api.start(0)
    try:
        status, body = await post(api, chat("hello"))
        assert status == 500 and "simulated" in body["error"]["message"]
        assert (api.tally.requests, api.tally.failed, api.tally.prompt_tokens) == (1, 1, 0)
        lab.faults.api_fail_fraction = 0.3
        statuses = [(await post(api, chat(f"hello {i}")))[0] for i in range(60)]
        fails = statuses.count(500)
        assert 6 <= fails <= 30 and set(statuses) == {200, 500}
        assert api.tally.failed == fails + 1
    finally:
        await api.stop()


async def test_one_request_at_a_time_keeps_the_cluster_busy():
    lab = make_lab(api_delay_s=0.15)
    api = SimApi(lab)
    await api.start(0)
    try:
        t0 = time.monotonic()
        results = await asyncio.gather(*(post(api, chat(f"q{i}")) for i in range(3)))
        elapsed = time.monotonic() - t0
        assert all(r[0] == 200 for r in results)
        assert elapsed >= 3 * 0.15 - 0.02  # served one after another, not together
        assert lab._busy == 0
    finally:
        await api.stop()


async def test_inference_holds_the_cluster_busy_for_the_modelled_time():
    lab = make_lab()
    lab.clock.scale = 20.0  # slow enough to observe: about 0.5 s of real time
    api = SimApi(lab)
    await api.start(0)
    try:
        content = "word " * 400
        n_prompt = prompt_tokens([{"role": "user", "content": content}])
        expected_virtual = lab.physics.inference_seconds(lab.deployed, n_prompt, count_tokens(
            "This is a simulated answer from the simulated lab.") + 1)
        t_sent = lab.clock.now()
        task = asyncio.ensure_future(post(api, chat(content, max_tokens=64)))
        async with asyncio.timeout(10):
            while not lab.busy:
                await asyncio.sleep(0.005)
        t0 = lab.clock.now()
        assert t0 - t_sent < expected_virtual  # busy while the request is served
        await task
        assert not lab.busy
        assert lab.clock.now() - t0 == pytest.approx(expected_virtual, rel=0.5, abs=3.0)
    finally:
        await api.stop()
