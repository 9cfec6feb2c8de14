"""The OpenAI server on loopback against LLM.generate on the same tiny model: the official openai client, raw
SSE, bad inputs, API keys, overload, client disconnects and a failing engine step."""

import argparse
import asyncio
import json
import random
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_paged import SamplingParams
from hf_paged.blocks import DEFAULT_BLOCK_SIZE
from hf_paged.server import add_serve_args, launch, run_serve
from hf_paged.server import app as app_module
from tests.server.conftest import MODEL_NAME, LiveServer
from tests.tiny import VOCAB, tiny_model, tiny_tokenizer

PROMPT = "w10 w11 w12 w13 w14"
MESSAGES = [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "w20 w21 w22"}]
TIMEOUT = httpx.Timeout(30.0)


def _client(live, api_key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=api_key, max_retries=0, timeout=30.0)


def _http(live) -> httpx.Client:
    return httpx.Client(base_url=live.url, timeout=TIMEOUT, trust_env=False)


def _ref(reference, prompt, **params):
    return reference.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def _sse(response: httpx.Response) -> list:
    """The JSON bodies of an SSE response; asserts it ends with [DONE]."""
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _metrics(live, **headers) -> dict:
    text = _http(live).get("/metrics", headers=headers).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------------------------------- openai client
def test_completion_matches_llm_generate(live, reference):
    out = _client(live).completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                           extra_body={"return_token_ids": True})
    live.wait_idle()
    ref = _ref(reference, PROMPT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.text == ref.outputs[0].text
    assert choice.model_extra["token_ids"] == ref.outputs[0].token_ids
    assert choice.model_extra["prompt_token_ids"] == ref.prompt_token_ids
    assert choice.finish_reason == ref.outputs[0].finish_reason
    n_out = len(ref.outputs[0].token_ids)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), n_out)
    assert out.usage.total_tokens == len(ref.prompt_token_ids) + n_out
    assert out.model == MODEL_NAME and out.object == "text_completion"


def test_chat_matches_llm_chat(live, reference):
    out = _client(live).chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    live.wait_idle()
    ref = reference.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_chat_default_max_tokens_runs_to_the_model_length(live, reference):
    body = {"messages": MESSAGES, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    out = _http(live).post("/v1/chat/completions", json=body).json()
    live.wait_idle()
    prompt_len = out["usage"]["prompt_tokens"]
    assert out["usage"]["completion_tokens"] == 512 - prompt_len  # max_model_len: the tiny model's 512 positions
    assert out["choices"][0]["finish_reason"] == "length"


def test_streams_equal_the_full_responses(live, reference):
    client = _client(live)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    chat_chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                                      temperature=0, stream=True))
    live.wait_idle()
    ref = _ref(reference, PROMPT, max_tokens=12, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.outputs[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)
    ref_chat = reference.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0]
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == ref_chat.outputs[0].text
    assert chat_chunks[-1].choices[0].finish_reason is not None


def test_n2_seeded_sampling_matches_llm_generate(live, reference):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, n=2, seed=7)
    client = _client(live)
    full = client.completions.create(**kwargs)
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    live.wait_idle()
    ref = _ref(reference, PROMPT, max_tokens=10, temperature=1.0, n=2, seed=7)
    texts = [o.text for o in ref.outputs]
    assert texts[0] != texts[1]
    assert [c.text for c in sorted(full.choices, key=lambda c: c.index)] == texts
    assert [streamed[0], streamed[1]] == texts


def test_batched_prompts_number_choices_per_prompt(live, reference):
    prompts = [PROMPT, [7, 8, 9, 10]]
    out = _client(live).completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    live.wait_idle()
    refs = reference.generate(prompts, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [r.outputs[0].text for r in refs for _ in range(2)]
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)


def test_logprobs_match_the_engine(live, reference):
    client = _client(live)
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2)
    live.wait_idle()
    ref = _ref(reference, PROMPT, max_tokens=8, temperature=0, logprobs=3).outputs[0]
    lp = out.choices[0].logprobs
    tok = reference.tokenizer
    assert lp.tokens == [tok.decode([t]) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([top[t] for t, top in zip(ref.token_ids, ref.logprobs)], abs=1e-5)
    assert [len(top) for top in lp.top_logprobs] == [len(top) for top in ref.logprobs]
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 2 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-6)  # greedy: the chosen token is the top one


def test_stop_string_cuts_full_and_streamed_text(live, reference):
    text = _ref(reference, PROMPT, max_tokens=12, temperature=0, ignore_eos=True).outputs[0].text
    stop = " ".join(text.split()[3:5])  # two words from the middle of the greedy output
    client = _client(live)
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    live.wait_idle()
    assert full.choices[0].text == text[: text.find(stop)]
    assert full.choices[0].finish_reason == "stop"
    assert streamed == full.choices[0].text


def test_models_health_and_metrics(live):
    client = _client(live)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    http = _http(live)
    assert http.get("/health").status_code == 200
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4)
    stats = live.wait_idle()
    metrics = _metrics(live)
    assert metrics["hf_paged_kv_blocks_total"] == 512
    assert metrics["hf_paged_kv_blocks_in_use"] == 0
    assert metrics["hf_paged_num_seqs_running"] == metrics["hf_paged_num_seqs_waiting"] == 0
    assert metrics["hf_paged_num_requests_in_flight"] == 0
    assert metrics["hf_paged_generation_tokens_total"] == stats.generation_tokens > 0
    assert metrics["hf_paged_prefix_cache_hit_rate"] == pytest.approx(stats.prefix_cache_hit_rate)
    assert 0 < stats.prefix_cache_hit_rate <= 1  # PROMPT was served before: its full blocks are cached
    assert metrics["hf_paged_generation_tokens_per_second"] >= 0


# ---------------------------------------------------------------------------------------------- bad requests
LONG = " ".join(["w10"] * 600)
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
BAD = [
    # (path, body: dict or raw text, status, fragment of the message)
    (COMP, {"prompt": LONG}, 400, "the prompt has 600 tokens"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "the model takes at most 511"),
    (COMP, {"prompt": ""}, 400, "the prompt is empty"),
    (COMP, {"prompt": LONG, "stream": True}, 400, "the prompt has 600 tokens"),  # refused before any SSE
    (COMP, {"prompt": []}, 400, "the prompt is empty"),
    (COMP, {"prompt": ["w10", ""]}, 400, "the prompt is empty"),
    (COMP, '{"prompt": "w10",', 400, "not valid JSON"),
    (COMP, "", 400, "not valid JSON"),
    (COMP, '["w10"]', 400, "must be a JSON object"),
    (COMP, {}, 400, "prompt: Field required"),
    (COMP, {"prompt": 5}, 400, "prompt must be a string"),
    (COMP, {"prompt": [1, 1000]}, 400, "outside the vocabulary"),
    (COMP, {"prompt": "w10", "max_tokens": -5}, 400, "max_tokens must be >= 1"),
    (COMP, {"prompt": "w10", "max_tokens": "ten"}, 400, "max_tokens: Input should be a valid integer"),
    (COMP, {"prompt": "w10", "max_tokens": 4.5}, 400, "max_tokens: Input should be a valid integer"),
    (COMP, {"prompt": "w10", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist"),
    (COMP, {"prompt": "w10", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    (COMP, {"prompt": "w10", "temperature": -1}, 400, "temperature must be in"),
    (COMP, {"prompt": "w10", "top_p": 1.5}, 400, "top_p must be in"),
    (COMP, {"prompt": "w10", "n": 1000}, 400, "n must be <= 128"),
    (COMP, {"prompt": "w10", "n": 0}, 400, "n must be >= 1"),
    (COMP, {"prompt": "w10", "n": 100, "max_tokens": 500}, 400, "KV blocks"),
    (COMP, {"prompt": "w10", "n": True}, 400, "n: Input should be a valid integer"),
    (COMP, {"prompt": "w10", "logprobs": 50}, 400, "logprobs must be in [0, 20]"),
    (COMP, {"prompt": "w10", "stop": 5}, 400, "stop must be a str or a list of str"),
    (COMP, {"prompt": "w10", "stop": ["w11", 3]}, 400, "stop must contain only str"),
    (COMP, {"prompt": "w10", "presence_penalty": 3}, 400, "presence_penalty must be in"),
    (COMP, {"prompt": "w10", "seed": "abc"}, 400, "seed: Input should be a valid integer"),
    (COMP, {"prompt": "w10", "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
    (COMP, {"prompt": "w10", "stream_options": {"include_usage": True}}, 400, "only allowed with stream=true"),
    (COMP, {"prompt": "w10", "echo": True}, 400, "echo is not supported"),
    (COMP, {"prompt": "w10", "best_of": 3}, 400, "best_of is not supported"),
    (COMP, {"prompt": "w10", "logit_bias": {"7": 10}}, 400, "logit_bias is not supported"),
    (COMP, {"prompt": "w10", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens (20) must be <= max_tokens"),
    (CHAT, {}, 400, "messages: Field required"),
    (CHAT, {"messages": []}, 400, "messages must not be empty"),
    (CHAT, {"messages": "w10"}, 400, "messages: Input should be a valid array"),
    (CHAT, {"messages": [{"role": "wizard", "content": "w10"}]}, 400, "role must be one of"),
    (CHAT, {"messages": [{"content": "w10"}]}, 400, "messages.0.role: Field required"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "content must be a string or a list of text parts"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "only text parts are supported"),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs must be in [0, 20]"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs needs logprobs=true"),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools and functions are not supported"),
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    (CHAT, {"messages": MESSAGES, "temperature": -0.5}, 400, "temperature must be in"),
    (CHAT, {"messages": MESSAGES, "model": "nope"}, 404, "does not exist"),
]


def test_bad_requests_get_openai_errors(live):
    http = _http(live)
    for path, body, status, message in BAD:
        kwargs = {"content": body} if isinstance(body, str) else {"json": body}
        response = http.post(path, headers={"content-type": "application/json"}, **kwargs)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert message in error["message"], (body, error)
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    assert len(BAD) >= 20
    assert http.get("/v1/completions").status_code == 405
    assert http.get("/v1/nothing-here").json()["error"]["message"] == "Not Found"
    assert http.get("/v1/models/nope").status_code == 404
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        _client(live).completions.create(model=MODEL_NAME, prompt="w10", top_p=2.0)
    live.wait_idle()


def test_api_key_guards_every_route_but_health(start_server):
    guarded = start_server(api_key="sekret", seed=1)
    http = _http(guarded)
    assert http.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", COMP), ("POST", CHAT)):
            response = http.request(method, path, headers=headers, json={"prompt": "w10"})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(guarded, api_key="wrong").models.list()
    out = _client(guarded, api_key="sekret").completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3)
    assert len(out.choices[0].text) > 0
    assert _metrics(guarded, Authorization="Bearer sekret")["hf_paged_kv_blocks_in_use"] == 0
    guarded.wait_idle()


# ---------------------------------------------------------------------------------------------- load and failures
def _slow_down(live, monkeypatch, seconds=0.005):
    """Make every engine step last at least `seconds` longer, so long requests stay in flight a while."""
    runner = live.server.engine.runner
    execute = runner.execute

    def slow(out, *args):
        time.sleep(seconds)
        return execute(out, *args)

    monkeypatch.setattr(runner, "execute", slow)


def test_429_past_max_queue_then_recovers(start_server, monkeypatch):
    small = start_server(max_queue=2, seed=1)
    _slow_down(small, monkeypatch)  # the two streams below last >= 2 s
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=small.url, timeout=TIMEOUT, trust_env=False) as http:
            async with http.stream("POST", COMP, json=body) as a, http.stream("POST", COMP, json=body) as b:
                assert a.status_code == b.status_code == 200
                lines = [a.aiter_lines(), b.aiter_lines()]  # NOTE: a dropped iterator closes its connection
                for stream_lines in lines:
                    await anext(stream_lines)
                third = await http.post(COMP, json={"prompt": PROMPT, "max_tokens": 2})
                assert third.status_code == 429
                error = third.json()["error"]
                assert error["code"] == "rate_limit_exceeded" and "limit of 2 requests" in error["message"]
                assert _metrics(small)["hf_paged_num_requests_in_flight"] == 2
        # Both streams were closed early: their requests are aborted and the queue has room again.

    asyncio.run(asyncio.wait_for(main(), 30))
    stats = small.wait_idle()
    assert stats.generation_tokens < 2 * 400
    ok = _http(small).post(COMP, json={"prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    small.wait_idle()


def test_64_concurrent_streams_with_random_disconnects(live, reference):
    rng = random.Random(0)
    jobs = []
    for i in range(64):
        prompt = [rng.randrange(7, VOCAB) for _ in range(rng.randint(3, 30))]
        if i % 4 == 0:
            prompt = [11, 12, 13, 14, 15, 16, 17, 18] + prompt  # a shared prefix for the prefix cache
        jobs.append((prompt, rng.randint(4, 24), rng.randint(1, 3) if rng.random() < 0.4 else None))

    async def one(http, prompt, max_tokens, cut_after):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True}
        ids, text, events = [], "", 0
        async with http.stream("POST", COMP, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line:
                    continue
                if cut_after is not None and events >= cut_after:
                    return None  # leaving the block closes the connection mid-stream
                events += 1
                if line == "data: [DONE]":
                    return ids, text
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                ids += choice["token_ids"]
                text += choice["text"]
        raise AssertionError("the stream ended without [DONE]")

    async def main():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(base_url=live.url, timeout=TIMEOUT, limits=limits, trust_env=False) as http:
            return await asyncio.gather(*(one(http, *job) for job in jobs))

    start = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), 45))
    assert time.monotonic() - start < 45
    live.wait_idle()
    done = [(job, r) for job, r in zip(jobs, results) if r is not None]
    assert len(done) == sum(job[2] is None for job in jobs) and len(done) >= 30
    refs = reference.generate([job[0] for job, _ in done],
                              [SamplingParams(max_tokens=job[1], temperature=0, ignore_eos=True) for job, _ in done],
                              use_tqdm=False)
    for (job, (ids, text)), ref in zip(done, refs):
        assert ids == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text
    assert _metrics(live)["hf_paged_kv_blocks_in_use"] == 0


def test_non_streaming_disconnect_aborts(live, monkeypatch):
    _slow_down(live, monkeypatch)  # >= 2.5 s for the 500 tokens below
    before = live.server.front.last_stats.generation_tokens
    with pytest.raises(httpx.ReadTimeout):
        _http(live).post(COMP, json={"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}, timeout=0.5)
    stats = live.wait_idle()
    assert 0 < stats.generation_tokens - before < 400


def test_failing_step_fails_its_request_and_the_loop_survives(live, reference, monkeypatch):
    runner = live.server.engine.runner
    execute = runner.execute
    calls = {"n": 0}

    def flaky(out, *args, fail_at):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected step failure")
        return execute(out, *args)

    http = _http(live)
    monkeypatch.setattr(runner, "execute", lambda out, *args: flaky(out, *args, fail_at=1))
    failed = http.post(COMP, json={"prompt": PROMPT, "max_tokens": 6})
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "server_error" and "injected step failure" in error["message"]
    live.wait_idle()

    calls["n"] = 0
    monkeypatch.setattr(runner, "execute", lambda out, *args: flaky(out, *args, fail_at=3))  # fails mid-stream
    events = _sse(http.post(COMP, json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}))
    assert "injected step failure" in events[-1]["error"]["message"]
    assert len(events) >= 2 and all("choices" in e for e in events[:-1])
    live.wait_idle()

    monkeypatch.setattr(runner, "execute", execute)
    ok = http.post(COMP, json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    live.wait_idle()
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["text"] == _ref(reference, PROMPT, max_tokens=6, temperature=0).outputs[0].text


# ---------------------------------------------------------------------------------------------- serve / CLI
def test_cli_options_reach_serve(monkeypatch):
    seen = {}
    monkeypatch.setattr(launch, "serve", lambda model, **kwargs: seen.update(model=model, **kwargs))
    args = add_serve_args(argparse.ArgumentParser()).parse_args(
        ["/models/x", "--port", "9001", "--api-key", "k", "--kv-cache-memory", "256MiB", "--max-num-seqs", "8",
         "--no-enable-prefix-caching", "--served-model-name", "x", "--max-queue", "3", "--enforce-eager"])
    run_serve(args)
    assert seen["model"] == "/models/x" and seen["port"] == 9001 and seen["host"] == "127.0.0.1"
    assert seen["kv_cache_memory"] == 256 * 2**20 and seen["max_num_seqs"] == 8
    assert seen["enable_prefix_caching"] is False and seen["api_key"] == "k"
    assert (seen["served_model_name"], seen["max_queue"], seen["block_size"]) == ("x", 3, DEFAULT_BLOCK_SIZE)
    assert seen["enforce_eager"] is True
    assert [launch.parse_bytes(t) for t in ("1024", "2GiB", "1.5kb", "3M")] == [1024, 2**31, 1500, 3 * 10**6]
    with pytest.raises(argparse.ArgumentTypeError):
        launch.parse_bytes("lots")


def test_serve_loads_a_local_model_directory(tmp_path, monkeypatch, reference):
    tiny_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    apps, configs = [], []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: apps.append((app, kwargs)))
    build = app_module.build_app
    monkeypatch.setattr(app_module, "build_app", lambda engine, *a, **k: configs.append(engine.config) or build(
        engine, *a, **k))
    launch.serve(str(tmp_path), port=9002, num_blocks=64, block_size=4)
    (app, kwargs), = apps
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 9002
    # Unset batch limits take the server defaults of the device (CPU: vLLM's 256 sequences, 8192 tokens a step),
    # and the requests in flight are bounded at 4 x max_num_seqs.
    assert (configs[0].max_num_seqs, configs[0].max_num_batched_tokens, configs[0].block_size) == (256, 8192, 4)
    assert app.state.server.max_queue == app_module.QUEUE_PER_SEQ * 256
    served = LiveServer(app)
    try:
        out = _client(served).completions.create(model=str(tmp_path), prompt=PROMPT, max_tokens=5, temperature=0)
        served.wait_idle()
    finally:
        served.stop()
    assert out.choices[0].text == _ref(reference, PROMPT, max_tokens=5, temperature=0).outputs[0].text
