"""The benchmark runner: real lm-eval (its evaluate, on tasks built once per process) against the simulated
dllama-api on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epiconsole.benchmark.catalog import model_spec, plan_tasks
from epiconsole.benchmark.localdata import DATA_DIR
from epiconsole.benchmark.results import BenchProgress
from epiconsole.benchmark.suite import BenchmarkError, run_suite
from epiconsole.config import BenchmarkConfig, TaskConfig
from epiconsole.sim.api import SimApi
from tests.bench_fixtures import free_port, make_lab

ROOT = Path(__file__).resolve().parents[1]
BENCH = BenchmarkConfig()  # mmlu 5-shot, arc_challenge 25-shot, hellaswag 10-shot; mapped to local tasks on the sim


async def serve(**faults: float) -> SimApi:
    api = SimApi(make_lab(**faults))
    await api.start(0)
    return api


def within_3se(acc: float, p: float, n: int) -> bool:
    return abs(acc - p) <= 3 * (p * (1 - p) / n) ** 0.5


async def test_suite_on_the_simulated_api_scores_and_counts_like_the_sim():
    api = await serve()
    seen: list[BenchProgress] = []
    try:
        res = await run_suite(api.url, BENCH, simulated=True, on_progress=seen.append)
    finally:
        await api.stop()
    physics, deployed = api.lab.physics, api.lab.deployed
    assert set(res.tasks) == {"mmlu", "arc_challenge", "hellaswag"}
    for key, score in res.tasks.items():
        assert score.n == 30 and score.shots == 2
        assert score.name == {"mmlu": "epi_mmlu_local", "arc_challenge": "epi_arc_local",
                              "hellaswag": "epi_hellaswag_local"}[key]
        assert within_3se(score.acc, physics.accuracy(key, deployed), score.n), (key, score.acc)
        assert score.stderr == pytest.approx((score.acc * (1 - score.acc) / (score.n - 1)) ** 0.5, rel=1e-6)
    expected = sum(physics.accuracy(k, deployed) for k in res.tasks) / 3
    assert within_3se(res.composite, expected, 90)
    # Every scored answer came from the sim, and the tokens are exactly the sum of the usage it reported.
    assert res.requests == api.tally.requests == 90 and res.failed_requests == 0
    assert (res.prompt_tokens, res.completion_tokens) == (api.tally.prompt_tokens, api.tally.completion_tokens)
    assert res.prompt_tokens > 0 and res.completion_tokens >= 90
    assert sum(s.correct for s in res.samples) == api.tally.correct
    assert len(res.samples) == 90
    assert sum(s.prompt_tokens for s in res.samples) == res.prompt_tokens
    assert all(s.answer in "ABCD" and len(s.prompt_hash) == 64 for s in res.samples)
    prov = res.provenance
    assert prov.simulated and prov.api_model_id == "dllama_model_baseline_q40" and prov.seed == BENCH.seed
    assert prov.lm_eval_version.startswith("0.4.")
    assert prov.tasks["mmlu"]["versions"] == {"epi_mmlu_local": 1.0}
    summary = res.summary()
    assert set(summary) == {"tasks", "composite", "tokens", "requests", "failed_requests", "duration_s",
                            "lm_eval_version", "simulated"}
    json.dumps(res.to_dict())
    await asyncio.sleep(0)  # progress callbacks are scheduled on this loop
    assert seen and seen[-1].done == seen[-1].total == 90


async def test_failed_requests_are_retried_counted_and_leave_accuracy_unchanged():
    bench = dataclasses.replace(BENCH, limit=10, retries=4)
    clean, flaky = await serve(), await serve(api_fail_fraction=0.1)
    try:
        a = await run_suite(clean.url, bench, simulated=True)
        b = await run_suite(flaky.url, bench, simulated=True)
    finally:
        await clean.stop()
        await flaky.stop()
    assert flaky.tally.failed > 0
    assert b.failed_requests == flaky.tally.failed
    assert b.requests == flaky.tally.requests == 30 + flaky.tally.failed
    assert (b.prompt_tokens, b.completion_tokens) == (flaky.tally.prompt_tokens, flaky.tally.completion_tokens)
    # The simulated model's answer depends only on the prompt, so retried items score exactly as before.
    assert {k: t.acc for k, t in b.tasks.items()} == {k: t.acc for k, t in a.tasks.items()}
    assert (b.prompt_tokens, b.completion_tokens) == (a.prompt_tokens, a.completion_tokens)


def _prompts(res) -> dict[tuple[str, int], str]:
    return {(s.task, s.doc_id): s.prompt_hash for s in res.samples}


def _count_builds(monkeypatch) -> list[bool]:
    """Every task set lm-eval builds from here on, as its ``cached`` flag."""
    from epiconsole.benchmark import tasksets

    built: list[bool] = []
    build = tasksets._build

    def counting(*args, cached: bool, **kwargs):
        built.append(cached)
        return build(*args, cached=cached, **kwargs)

    monkeypatch.setattr(tasksets, "_build", counting)
    return built


async def test_runs_on_the_same_cached_tasks_are_independent(monkeypatch):
    """lm-eval's tasks are built once and lent to run after run: nothing of one run may reach the next."""
    from epiconsole.benchmark import tasksets

    bench = dataclasses.replace(BENCH, limit=4)
    api = await serve()
    try:
        await asyncio.to_thread(tasksets.warm_up, bench, simulated=True)
        built = _count_builds(monkeypatch)
        tally: list[tuple[int, int, int, int]] = []
        results = []
        for b in (bench, bench, dataclasses.replace(bench, seed=7), dataclasses.replace(bench, limit=6), bench):
            before = (api.tally.requests, api.tally.prompt_tokens, api.tally.completion_tokens, api.tally.correct)
            results.append(await run_suite(api.url, b, simulated=True))
            after = (api.tally.requests, api.tally.prompt_tokens, api.tally.completion_tokens, api.tally.correct)
            tally.append(tuple(x - y for x, y in zip(after, before, strict=True)))
    finally:
        await api.stop()
    first, second, reseeded, longer, again = results
    # The warmed-up task objects served every run (none was rebuilt), whatever the seed and limit.
    assert built == []
    assert all(not t._instances for ts in tasksets._SETS.values() for t in ts.tasks.values())
    for res, (requests, prompt, completion, correct), n in zip(results, tally, (4, 4, 4, 6, 4), strict=True):
        # Each run sent exactly its own requests (no request of an earlier run was kept and re-sent) ...
        assert res.requests == requests == 3 * n and res.failed_requests == 0
        assert (res.prompt_tokens, res.completion_tokens) == (prompt, completion)
        # ... and scored exactly the sim's answers to them, each item once.
        assert len(res.samples) == 3 * n and len(_prompts(res)) == 3 * n
        assert all(t.n == n for t in res.tasks.values())
        assert sum(s.correct for s in res.samples) == correct
    # Same seed, same prompts: the few-shot samplers are re-seeded before every run (arc and hellaswag
    # draw their shots at random), so the second and the last run repeat the first exactly.
    for res in (second, again):
        assert _prompts(res) == _prompts(first)
        assert {k: t.acc for k, t in res.tasks.items()} == {k: t.acc for k, t in first.tasks.items()}
        assert (res.prompt_tokens, res.completion_tokens) == (first.prompt_tokens, first.completion_tokens)
    # Another seed draws other shots for the randomly sampled tasks; MMLU's first_n shots stay.
    changed = {task for (task, doc), h in _prompts(reseeded).items() if _prompts(first)[(task, doc)] != h}
    assert changed == {"epi_arc_local", "epi_hellaswag_local"}
    assert reseeded.provenance.seed == 7 and again.provenance.seed == BENCH.seed
    assert {k: _prompts(longer)[k] for k in _prompts(first)} == _prompts(first)


async def test_a_failed_run_leaves_the_cached_tasks_clean_and_concurrent_runs_do_not_share_them(monkeypatch):
    from epiconsole.benchmark import tasksets

    bench = dataclasses.replace(BENCH, limit=3, retries=0)
    await asyncio.to_thread(tasksets.warm_up, bench, simulated=True)
    built = _count_builds(monkeypatch)
    broken, a, b = await serve(api_fail_fraction=1.0), await serve(api_delay_s=0.05), await serve(api_delay_s=0.05)
    try:
        with pytest.raises(BenchmarkError):
            await run_suite(broken.url, bench, simulated=True)
        # Two runs of the same suite at once: the second gets its own task objects, not the lent ones.
        ra, rb = await asyncio.gather(run_suite(a.url, bench, simulated=True), run_suite(b.url, bench, simulated=True))
    finally:
        for api in (broken, a, b):
            await api.stop()
    assert built == [False]
    for res, api in ((ra, a), (rb, b)):
        assert res.requests == api.tally.requests == 9 and len(res.samples) == 9
        assert (res.prompt_tokens, res.completion_tokens) == (api.tally.prompt_tokens, api.tally.completion_tokens)
        assert sum(s.correct for s in res.samples) == api.tally.correct
    assert _prompts(ra) == _prompts(rb)


def test_cached_templates_render_like_lm_evals_own():
    from lm_eval import utils

    from epiconsole.benchmark import tasksets

    tasksets.cache_templates()
    tasksets.cache_templates()  # idempotent: still one layer over lm-eval's own
    cached, uncached = utils.apply_template, utils.apply_template.uncached
    assert not getattr(uncached, "epiconsole_cached", False)
    doc = {"question": "  Why?  ", "choices": {"text": ["a", "b", "c"]}, "answerKey": "2"}
    for template in ("{{question.strip()}}\nA. {{choices.text[0]}}{% if choices.text|length > 3 %}D{% endif %}",
                     "{{ 'ABCD'[answerKey|int - 1] if answerKey|string in '1234' else answerKey }}", "plain"):
        assert cached(template, doc) == uncached(template, doc)
        assert cached(template, doc) == uncached(template, doc)  # the second render reads the cache
    assert cached("{{ 'ABCD'[answerKey|int - 1] }}", doc) == "B"


async def test_a_request_that_keeps_failing_stops_the_run_with_one_sentence():
    api = await serve(api_fail_fraction=1.0)
    try:
        with pytest.raises(BenchmarkError) as info:
            await run_suite(api.url, dataclasses.replace(BENCH, retries=1, limit=2), simulated=True)
    finally:
        await api.stop()
    assert "failed 2 times in a row" in str(info.value) and "\n" not in str(info.value)
    assert api.tally.requests == 2


async def test_unreachable_api_and_unknown_model_are_user_errors():
    with pytest.raises(BenchmarkError, match="cannot start the benchmark: cannot connect"):
        await run_suite(f"http://127.0.0.1:{free_port()}", BENCH, simulated=True)
    with pytest.raises(BenchmarkError, match="benchmark.model"):
        await run_suite(f"http://127.0.0.1:{free_port()}", dataclasses.replace(BENCH, model="hf"), simulated=True)


@pytest.mark.slow  # indexes lm-eval's thousands of built-in task YAMLs (about 10 s, once per process)
async def test_real_suite_names_exist_in_lm_eval_and_unknown_or_uncached_tasks_are_user_errors(monkeypatch):
    from epiconsole.benchmark.catalog import GENERATIVE
    from epiconsole.benchmark.localdata import TASKS_DIR
    from epiconsole.benchmark.tasksets import task_manager

    tm = await asyncio.to_thread(task_manager, True, [str(TASKS_DIR)])
    assert set(GENERATIVE.values()) <= set(tm.task_index)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    api = await serve()
    try:
        with pytest.raises(BenchmarkError, match="no task named 'no_such_task_xyz'"):
            await run_suite(api.url, BenchmarkConfig(tasks=(TaskConfig("no_such_task_xyz"),)), simulated=False)
        if not (Path.home() / ".cache/huggingface/datasets/allenai___ai2_arc").exists():
            with pytest.raises(BenchmarkError, match=r"arc_challenge_chat \(allenai/ai2_arc\) is not available"):
                await run_suite(api.url, BenchmarkConfig(tasks=(TaskConfig("arc_challenge", shots=1),), limit=1),
                                simulated=False)
    finally:
        await api.stop()


def _task_dir(tmp_path: Path, yaml: str) -> Path:
    d = tmp_path / "tasks"
    d.mkdir()
    shutil.copy(DATA_DIR / "mmlu_local.test.jsonl", d / "items.jsonl")
    (d / "task.yaml").write_text(yaml)
    return d


async def test_loglikelihood_tasks_name_the_generative_alternative(tmp_path):
    d = _task_dir(tmp_path, """
task: epi_test_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    api = await serve()
    try:
        bench = BenchmarkConfig(tasks=(TaskConfig("epi_test_loglikelihood"),), limit=2, task_dir=str(d))
        with pytest.raises(BenchmarkError) as info:
            await run_suite(api.url, bench, simulated=True)
    finally:
        await api.stop()
    msg = str(info.value)
    assert "no logprobs" in msg and "mmlu_generative" in msg and "local-completions" in msg
    assert api.tally.requests == 0


async def test_a_dataset_that_cannot_be_loaded_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    d = _task_dir(tmp_path, """
task: epi_test_missing
dataset_path: epiconsole-tests/no-such-dataset
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: answer
metric_list:
  - metric: exact_match
""")
    api = await serve()
    try:
        bench = BenchmarkConfig(tasks=(TaskConfig("epi_test_missing"),), limit=2, task_dir=str(d))
        with pytest.raises(BenchmarkError) as info:
            await run_suite(api.url, bench, simulated=True)
    finally:
        await api.stop()
    msg = str(info.value)
    assert "epi_test_missing (epiconsole-tests/no-such-dataset) is not available" in msg
    assert "cache" in msg and "\n" not in msg


async def test_cancelling_stops_after_the_request_in_flight():
    api = await serve(api_delay_s=0.05)
    try:
        task = asyncio.ensure_future(run_suite(api.url, BENCH, simulated=True))
        async with asyncio.timeout(60):  # lm-eval's first start in a process indexes our tasks
            while api.tally.requests < 3:
                await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        stopped_at = api.tally.requests
        await asyncio.sleep(0.3)
        assert api.tally.requests <= stopped_at + 1 and stopped_at < 90
    finally:
        await api.stop()


async def test_a_metric_can_be_named_with_its_filter():
    api = await serve()
    try:
        bench = BenchmarkConfig(tasks=(TaskConfig("mmlu", metric="exact_match,get_response"),), limit=3)
        res = await run_suite(api.url, bench, simulated=True)
    finally:
        await api.stop()
    score = res.tasks["mmlu"]
    assert score.metric == "exact_match,get_response" and score.n == 3
    assert score.acc == sum(s.correct for s in res.samples) / 3
    assert score.version == "1.0"


def test_task_and_model_selection():
    real = plan_tasks(BENCH, simulated=False)
    assert [(p.key, p.lm_eval_name, p.shots) for p in real] == [
        ("mmlu", "mmlu_generative", 5), ("arc_challenge", "arc_challenge_chat", 25),
        ("hellaswag", "epi_hellaswag_gen", 10)]
    ll = plan_tasks(dataclasses.replace(BENCH, model="local-completions"), simulated=False)
    assert [p.lm_eval_name for p in ll] == ["mmlu", "arc_challenge", "hellaswag"]
    sim = plan_tasks(BENCH, simulated=True)
    assert [(p.lm_eval_name, p.shots) for p in sim] == [
        ("epi_mmlu_local", 2), ("epi_arc_local", 2), ("epi_hellaswag_local", 2)]
    custom = BenchmarkConfig(tasks=(TaskConfig("gsm8k", shots=3, weight=2.0),))
    assert [(p.lm_eval_name, p.shots, p.weight) for p in plan_tasks(custom, simulated=False)] == [("gsm8k", 3, 2.0)]

    spec = model_spec(BENCH, "http://pi0:9990/", "m", 60.0)
    assert spec.name == "dllama-chat" and spec.args["base_url"] == "http://pi0:9990"
    spec = model_spec(dataclasses.replace(BENCH, model="local-completions"), "http://pi0:8080", "qwen", 60.0)
    assert spec.name == "epi-local-completions"
    assert spec.args["base_url"] == "http://pi0:8080/v1/completions" and spec.args["model"] == "qwen"
    assert spec.args["max_retries"] == BENCH.retries + 1


def test_local_completions_model_counts_usage():
    from lm_eval.api.registry import get_model
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from epiconsole.benchmark.lmeval_models import CountingLocalCompletions, TokenLedger

    cls = get_model("epi-local-completions")
    assert cls is CountingLocalCompletions and issubclass(cls, LocalCompletionsAPI)
    # Built without __init__: lm-eval's API models need its [api] extra (tenacity), which the bench
    # extra does not install; the counting itself needs none of it.
    lm = CountingLocalCompletions.__new__(CountingLocalCompletions)
    lm.ledger = TokenLedger()
    out = {"choices": [{"index": 0, "text": " B", "logprobs": None}],
           "usage": {"prompt_tokens": 40, "completion_tokens": 2}}
    assert lm.parse_generations(out) == [" B"]
    assert lm.parse_generations([out, out]) == [" B", " B"]
    assert (lm.ledger.requests, lm.ledger.prompt_tokens, lm.ledger.completion_tokens) == (3, 120, 6)


def test_bench_command_errors_are_one_line(capsys):
    from epiconsole.cli import main

    rc = main(["bench", "--url", f"http://127.0.0.1:{free_port()}", "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot connect to dllama-api" in err
    assert main(["bench", "--sim", "--tasks", "mmlu:x"]) == 2
    assert "whole number" in capsys.readouterr().err


def test_bench_command_options():
    from epiconsole import config
    from epiconsole.commands.bench import _bench_config, api_url

    cfg = config.sim_defaults()
    assert api_url(cfg) == "http://pi0.local:9990"
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, api_host="fe80::1", api_port=8080))
    assert api_url(cfg) == "http://[fe80::1]:8080"
    b = _bench_config(BENCH, ["mmlu:1,hellaswag", "gsm8k:3"], 7)
    assert [(t.name, t.shots) for t in b.tasks] == [("mmlu", 1), ("hellaswag", 10), ("gsm8k", 3)]
    assert b.limit == 7 and _bench_config(BENCH, None, None) == BENCH


def test_lm_eval_is_imported_only_by_the_benchmark_path():
    script = """
import contextlib, io, json, sys
import epiconsole, epiconsole.cli
from epiconsole.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["matrix"]) == 0
before = sorted(m for m in ("lm_eval", "datasets", "torch", "transformers") if m in sys.modules)
rc = main(["bench", "--sim", "--json", "--limit", "3", "--tasks", "mmlu,hellaswag"])
print(json.dumps({"before": before, "after": "lm_eval" in sys.modules, "rc": rc}), file=sys.stderr)
"""
    env = {k: v for k, v in os.environ.items() if k != "EPICONSOLE_CONFIG"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(proc.stderr.strip().splitlines()[-1])
    assert status == {"before": [], "after": True, "rc": 0}
    out = json.loads(proc.stdout)
    assert set(out) == {"tasks", "composite", "tokens", "requests", "failed_requests", "duration_s",
                        "lm_eval_version", "simulated"}
    assert set(out["tasks"]) == {"mmlu", "hellaswag"} and out["tasks"]["mmlu"]["n"] == 3
    assert out["simulated"] is True and out["tokens"]["prompt"] > 0 and out["tokens"]["completion"] > 0
    assert out["requests"] == 6 and out["failed_requests"] == 0
