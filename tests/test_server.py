"""The HTTP server over real loopback sockets — OpenAI routes with the official client, native
routes with httpx, errors, auth, and clients that disconnect mid-request."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
from engine_support import sse_events, wait_idle

from hotswap import Engine
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

openai = pytest.importorskip("openai")  # the OpenAI routes are driven by the official client

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPT = "Alice likes 12 apples"


def pick_stop(text: str) -> str:
    """A short plain-ASCII piece from the middle of `text` (clear of partial UTF-8 replacement chars)."""
    for i in range(max(1, len(text) // 3), len(text) - 1):
        piece = text[i: i + 2]
        if piece.isascii() and piece.isalnum():
            return piece
    pytest.skip(f"no plain stop string in {text!r}")


def assert_clean(engine: Engine) -> None:
    wait_idle(engine)
    res = engine.check_invariants()
    assert res.success, res.message


# ---- OpenAI routes ----------------------------------------------------------------------------------


def test_models(oai, engine, tiny_qwen3):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert oai.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("other-model")


def test_completion_matches_engine_and_stream(oai, engine):
    ref = engine.generate(PROMPT, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    res = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    choice = res.choices[0]
    assert choice.text == ref["text"]
    assert choice.finish_reason == "length"
    assert res.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert res.usage.completion_tokens == 12
    assert res.usage.total_tokens == res.usage.prompt_tokens + 12
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert all(len(top) >= 1 for top in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)

    chunks = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    streamed_lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed_lps == pytest.approx(lp.token_logprobs)
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_completion_batch_n_seed(oai):
    kw = dict(model="tiny", prompt=["Bob sees", "Carol counts 7"], max_tokens=8, temperature=1.0, n=3, seed=11)
    a = oai.completions.create(**kw)
    b = oai.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1
    streamed = [""] * 6
    for chunk in oai.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in a.choices]


def test_negative_seeds_as_vllm_takes_them(http):
    """vLLM's seed range is int64 and -1 means unseeded (SamplingParams); another negative seed is a seed of its own."""
    body = {"model": "tiny", "prompt": "Bob sees", "max_tokens": 6, "temperature": 1.0, "n": 4}
    texts = lambda seed: [c["text"] for c in http.post("/v1/completions", json={**body, "seed": seed}).json()["choices"]]
    assert texts(-5) == texts(-5) and len(set(texts(-5))) > 1
    assert texts(-1) != texts(-1)  # unseeded: two calls differ
    r = http.post("/v1/completions", json={**body, "seed": -(2**63) - 1})
    assert r.status_code == 400, r.text


def test_an_overlong_chat_names_its_messages(http, engine):
    long = " ".join(["word"] * 4 * engine.max_context_len)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": long}], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "context length" in r.json()["error"]["message"]


def test_completion_token_prompt_and_stop(oai, engine):
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    full = oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = pick_stop(text)
    cut = oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="tiny", prompt=ids, max_tokens=12, temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == cut.choices[0].text


def abort_while_queued(http, engine, route: str, body: dict, rid: str) -> httpx.Response:
    """POST `body` while generation is paused in place, abort it by `rid` once it waits, and return its reply."""
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        box = {}
        t = threading.Thread(target=lambda: box.update(reply=http.post(route, json=body)))
        t.start()
        deadline = time.monotonic() + 30
        while engine.get_load().num_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert http.post("/abort_request", json={"rid": rid}).status_code == 200
        t.join(10)
        return box["reply"]
    finally:
        assert http.post("/continue_generation").status_code == 200


def test_openai_routes_take_sglangs_rid_and_vllms_request_fields(http, engine):
    """From a black-box sweep against SGLang's and vLLM's OpenAI servers: `rid` names the request (the reply's id,
    /abort_request reaches it); include_stop_str_in_output keeps the stop string; top_k 0 is off (vLLM);
    continuous_usage_stats puts the counts so far on every chunk; a prompt's cached tokens count once over its n
    samples; vLLM fields that change what is sampled and are not served are refused by name, not ignored."""
    ids = engine.tokenizer.encode(PROMPT)
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 3, "temperature": 0, "rid": "cmpl-mine", "top_k": 0})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-mine", r.text
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "rid": "chat-mine"})
    assert r.status_code == 200 and r.json()["id"] == "chat-mine", r.text
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "rid": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rid", r.text  # one prompt, one rid
    r = http.post("/v1/completions", json={"prompt": [ids, ids], "max_tokens": 1, "rid": "pair"})
    assert r.status_code == 200 and r.json()["id"] == "pair_0", r.text  # a batch named by one string: SGLang's {rid}_{i}
    aborted = abort_while_queued(http, engine, "/v1/completions", {"prompt": ids, "max_tokens": 400, "ignore_eos": True, "rid": "to-abort"},
                                 "to-abort")
    assert aborted.json()["choices"][0]["finish_reason"] == "abort"
    text = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
    stop = text[3:5]
    kept = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [stop],
                                              "include_stop_str_in_output": True}).json()["choices"][0]
    assert kept["finish_reason"] == "stop" and kept["text"] == text[: text.index(stop) + len(stop)]
    body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        chunks = [json.loads(x[len("data: "):]) for x in resp.iter_lines() if x.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"] and c["usage"] is not None]
    assert counts and counts == sorted(counts) and counts[-1] == 4 and chunks[-1]["usage"]["completion_tokens"] == 4
    repeat = {"messages": [{"role": "user", "content": "count to ten please, slowly and out loud"}], "max_tokens": 2}
    http.post("/v1/chat/completions", json=repeat)  # the prompt's pages are cached now: both samples below hit them
    twice = http.post("/v1/chat/completions", json={**repeat, "n": 2}).json()["usage"]
    assert 0 < twice["prompt_tokens_details"]["cached_tokens"] <= twice["prompt_tokens"], twice
    for route, field, value in (("/v1/completions", "allowed_token_ids", [5]), ("/v1/completions", "bad_words", ["x"]),
                                ("/v1/completions", "truncate_prompt_tokens", 2), ("/v1/chat/completions", "echo", True),
                                ("/v1/chat/completions", "prompt_logprobs", 1)):
        req = {"prompt": ids} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
        r = http.post(route, json={**req, "max_tokens": 2, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)


def test_chat_samples_with_the_models_generation_config_where_the_request_is_silent(tiny_qwen3, tmp_path):
    """SGLang's chat (sampling_defaults="model"): temperature, top_p, top_k, min_p and repetition_penalty a request
    leaves unset come from generation_config.json (Qwen3 ships top_k 20); /v1/completions keeps the protocol's
    defaults, as SGLang's does. Here top_k 1 makes an unset chat greedy, whatever its seed."""
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen3, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.6, "top_k": 1, "do_sample": True}))
    with Engine(str(model), device="cpu", page_size=4) as eng, ServerThread(create_app(eng, served_model_name="tiny")) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        assert eng.model_config.sampling_defaults == {"temperature": 0.6, "top_k": 1}
        chat = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 8, "ignore_eos": True}
        texts = {client.post("/v1/chat/completions", json={**chat, "seed": seed}).json()["choices"][0]["message"]["content"]
                 for seed in (1, 2, 3)}
        assert len(texts) == 1  # top_k 1: every seed samples the same tokens
        free = {client.post("/v1/chat/completions", json={**chat, "seed": seed, "top_k": -1, "temperature": 5.0}).json()["choices"][0]
                ["message"]["content"] for seed in (1, 2, 3)}
        assert len(free) > 1  # the request's own values win
        plain = {client.post("/v1/completions", json={"prompt": "count", "max_tokens": 8, "ignore_eos": True, "seed": seed,
                                                      "temperature": 5.0}).json()["choices"][0]["text"] for seed in (1, 2, 3)}
        assert len(plain) > 1  # completions: no model defaults (SGLang's _build_sampling_params)


def test_chat_tool_call_arguments_reach_the_template_as_objects(http, engine):
    """OpenAI clients send a tool call's arguments as a JSON string; SGLang and vLLM parse them before the chat
    template runs, and templates such as Qwen3-Coder's iterate them as a mapping (the sweep got a 400 here)."""
    template = ("{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{% for c in m.tool_calls %}"
                "{% for k, v in c.function.arguments|items %}{{ k }}={{ v }};{% endfor %}{% endfor %}"
                "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    own = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = template
    try:
        messages = [{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert "city=Paris;" in engine.tokenizer.decode(r.json()["prompt_token_ids"])
        # arguments that are not a JSON object reach the template as the string they are: this template refuses it, by name
        messages[1]["tool_calls"][0]["function"]["arguments"] = "not json"
        r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"], r.text
    finally:
        engine.tokenizer.chat_template = own


def test_chat_uses_template_and_stream_equals_nonstream(oai, engine):
    messages = [{"role": "system", "content": "Count."}, {"role": "user", "content": "What is the sum of 3 plus 4?"}]
    templ = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer.encode(templ, add_special_tokens=False)
    ref = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})
    res = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                                      extra_body={"ignore_eos": True})
    choice = res.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref["text"]
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == 10
    assert len(choice.logprobs.content) == 10
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert choice.logprobs.content[0].top_logprobs[0].logprob >= choice.logprobs.content[0].top_logprobs[1].logprob

    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    lps = [t.logprob for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert lps == pytest.approx([t.logprob for t in choice.logprobs.content])

    # content as text parts renders the same prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the sum of 3 plus 4?"}]}]
    res2 = oai.chat.completions.create(model="tiny", messages=[messages[0], *parts], max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert res2.choices[0].message.content == choice.message.content


def test_chat_n_seed_default_max_tokens(oai, engine):
    msgs = [{"role": "user", "content": "hello"}]
    a = oai.chat.completions.create(model="default", messages=msgs, max_tokens=6, n=2, seed=3, temperature=0.8)
    b = oai.chat.completions.create(model="default", messages=msgs, max_tokens=6, n=2, seed=3, temperature=0.8)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 2
    # no max_tokens: runs to EOS or the context end (finishes either way)
    c = oai.chat.completions.create(model="tiny", messages=msgs, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens + c.usage.completion_tokens <= engine.max_context_len


def test_openai_errors(oai, http):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert "max_tokens" in str(exc.value)
    # any model name is served by the one model, as SGLang's server does
    assert oai.completions.create(model="gpt-4", prompt="x", max_tokens=2).model == "tiny"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny", prompt="x", max_tokens=2, presence_penalty=2.5)  # OpenAI's range is [-2, 2]
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny", prompt="x " * 600, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny", prompt="x", max_tokens=600)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])

    for body in (b"{not json", b"[1, 2]", b'"text"'):
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert set(r.json()["error"]) >= {"message", "type", "code"}
    r = http.post("/v1/completions", json={"prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": "hello"})
    assert r.status_code == 400
    r = http.post("/v1/completions", json={"prompt": "x", "n": 0})
    assert r.status_code == 400
    r = http.get("/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    assert http.get("/health").status_code == 200  # still alive


# ---- native routes ----------------------------------------------------------------------------------


def test_generate_native(http, engine):
    ref = engine.generate(PROMPT, GREEDY, return_logprob=True)
    r = http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY, "return_logprob": True})
    assert r.status_code == 200
    out = r.json()
    assert out["text"] == ref["text"] and out["output_ids"] == ref["output_ids"]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["completion_tokens"] == 12 and meta["weight_version"] == "default"
    assert [x[1] for x in meta["output_token_logprobs"]] == ref["output_ids"]

    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    r = http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY})
    assert r.json()["output_ids"] == ref["output_ids"]

    # batch (list of texts) and n > 1 return lists
    r = http.post("/generate", json={"text": [PROMPT, "Bob sees"], "sampling_params": GREEDY})
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == 2 and outs[0]["output_ids"] == ref["output_ids"]
    r = http.post("/generate", json={"input_ids": [ids, ids], "sampling_params": [GREEDY, dict(GREEDY, max_new_tokens=3)]})
    outs = r.json()
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [12, 3]
    r = http.post("/generate", json={"text": PROMPT, "sampling_params": {"max_new_tokens": 4, "n": 3, "seed": 5}})
    assert len(r.json()) == 3

    # SGLang parameters with neutral values are accepted; text in logprobs on request
    sg = dict(GREEDY, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0,
              spaces_between_special_tokens=True, no_stop_trim=False, regex=None)
    r = http.post("/generate", json={"text": PROMPT, "sampling_params": sg, "return_logprob": True, "return_text_in_logprobs": True,
                                     "image_data": None, "lora_path": None})
    assert r.status_code == 200, r.text
    assert all(isinstance(x[2], str) for x in r.json()["meta_info"]["output_token_logprobs"])


def test_generate_native_stream(http, engine):
    ref = engine.generate(PROMPT, GREEDY)
    with http.stream("POST", "/generate", json={"text": PROMPT, "sampling_params": GREEDY, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1]["text"] == ref["text"] and events[-1]["output_ids"] == ref["output_ids"]
    assert "".join(e["delta_text"] for e in events) == ref["text"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])

    # batch stream: chunks carry an index, each sub-stream equals its non-streamed output
    body = {"text": [PROMPT, "Bob sees"], "sampling_params": GREEDY}
    outs = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    last = {e["index"]: e for e in events}
    assert [last[i]["text"] for i in range(2)] == [o["text"] for o in outs]


def test_the_server_shortens_the_interpreter_lock_switch_interval(server):
    """The event loop shares the lock with the scheduler thread: the app bounds how long a busy loop keeps it."""
    import sys

    from hotswap.server.app import GIL_SWITCH_INTERVAL_S

    assert sys.getswitchinterval() <= GIL_SWITCH_INTERVAL_S


def test_generate_incremental_streaming_output(tiny_qwen3):
    """`--incremental-streaming-output`: /generate chunks carry only their new text, ids and logprobs (SGLang's
    flag); the OpenAI routes of the same server still stream correctly (they read cumulative chunks)."""
    import httpx

    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    sp = dict(GREEDY, max_new_tokens=8)
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, incremental_streaming_output=True) as eng, \
            ServerThread(create_app(eng, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        ref = http.post("/generate", json={"text": PROMPT, "sampling_params": sp, "return_logprob": True}).json()
        with http.stream("POST", "/generate", json={"text": PROMPT, "sampling_params": sp, "return_logprob": True, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert len(events) > 1 and "".join(e["text"] for e in events) == ref["text"]
        assert sum((e["output_ids"] for e in events), []) == ref["output_ids"]
        assert sum((e["meta_info"]["output_token_logprobs"] for e in events), []) == ref["meta_info"]["output_token_logprobs"]
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}
        whole = http.post("/v1/completions", json=body).json()["choices"][0]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            parts = [e["choices"][0] for e in sse_events(r.iter_lines()) if e.get("choices")]
        assert "".join(c["text"] for c in parts) == whole["text"]
        assert sum((c["logprobs"]["token_logprobs"] for c in parts), []) == whole["logprobs"]["token_logprobs"]


def test_generate_stop_and_no_stop_trim(http):
    base = http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}).json()["text"]
    stop = pick_stop(base)
    idx = base.index(stop)
    sp = dict(GREEDY, stop=[stop])
    trimmed = http.post("/generate", json={"text": PROMPT, "sampling_params": sp}).json()
    assert trimmed["text"] == base[:idx] and trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = http.post("/generate", json={"text": PROMPT, "sampling_params": dict(sp, no_stop_trim=True)}).json()
    assert kept["text"] == base[:idx] + stop


def test_custom_params_without_a_processor_are_metadata(http):
    """Clients tag requests in custom_params (a worker or job id). SGLang ignores them without a custom logit processor,
    so they change nothing here either; slime's return_top_p_token_ids beside them is still honoured."""
    sp = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 5, "seed": 11, "ignore_eos": True}
    base = http.post("/generate", json={"text": PROMPT, "sampling_params": sp}).json()
    tagged = http.post("/generate", json={"text": PROMPT, "sampling_params": dict(sp, custom_params={
        "simulation": {"worker_id": 3, "job_id": "j-17"}, "return_top_p_token_ids": True})})
    assert tagged.status_code == 200, tagged.text
    assert tagged.json()["output_ids"] == base["output_ids"]
    assert "top_p_token_ids" in tagged.json()["meta_info"] and "top_p_token_ids" not in base["meta_info"]


def test_generate_native_errors(http):
    cases = [
        {"sampling_params": GREEDY},  # neither text nor input_ids
        {"text": ["a", "b"], "input_ids": [1], "sampling_params": GREEDY},  # both given (allowed), shapes disagree
        {"text": "a", "sampling_params": {"max_new_tokens": -3}},
        {"text": "a", "sampling_params": {"bogus_param": 1}},
        {"text": "a", "sampling_params": {"stop": 5}},
        {"text": "a", "sampling_params": {"repetition_penalty": 3.0}},
        {"text": "a", "sampling_params": {"custom_params": "worker-3"}},  # not an object
        {"text": "a", "sampling_params": {"max_new_tokens": 2, "custom_params": {"x": 1}}, "custom_logit_processor": "{}"},
        {"text": "a", "sampling_params": {"regex": "a+"}},
        {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 3},  # past the end (2 is a start: SGLang scores nothing)
        {"text": "a", "sampling_params": "greedy"},
        {"input_ids": [10**9]},
        {"input_ids": []},
        {"text": 17},
        {"text": ["a", "b"], "sampling_params": [GREEDY]},
    ]
    for body in cases:
        r = http.post("/generate", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"]
    r = http.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": -1}, "stream": True})
    assert r.status_code == 400
    r = http.post("/generate", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert http.get("/health").status_code == 200


def test_info_routes(http, engine, tiny_qwen3):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    info = http.get("/get_model_info").json()
    assert info["model_path"] == str(tiny_qwen3) and info["is_generation"] is True and info["weight_version"] == "default"
    sinfo = http.get("/get_server_info").json()
    assert sinfo["page_size"] == 4 and sinfo["served_model_name"] == "tiny" and "internal_states" in sinfo
    assert http.get("/get_weight_version").json() == {"weight_version": "default"}
    assert http.get("/flush_cache").status_code == 200  # slime and verl flush with GET (no browser headers)
    r = http.post("/flush_cache")
    assert r.status_code == 200 and r.json()["success"] is True
    for body in ({"rid": "no-such-request"}, {"rid": ""}, {"abort_all": True}):  # SGLang: 200, empty body
        r = http.post("/abort_request", json=body)
        assert r.status_code == 200 and r.content == b""
    assert http.post("/abort_request", json={"rid": 5}).status_code == 400

    assert http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}).status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("hotswap_http_requests_total", "hotswap_prompt_tokens_total", "hotswap_generation_tokens_total",
                 "hotswap_num_waiting_requests", "hotswap_num_running_requests", "hotswap_kv_cache_usage_ratio",
                 "hotswap_weight_updates_total", "hotswap_weight_update_duration_seconds"):
        assert name in text, name
    assert 'hotswap_weight_version_info{version="default"' in text
    gen = [line for line in text.splitlines() if line.startswith("hotswap_generation_tokens_total ")]
    assert int(gen[0].split()[1]) > 0


def test_admin_api_key_guards_the_admin_routes_alone(engine):
    """SGLang's --admin-api-key: admin routes (weights, memory, pause, cache, abort) need it and refuse the API key;
    generation and status need the API key when one is set, and nothing when only the admin key is."""
    with ServerThread(create_app(engine, admin_api_key="adm1n", served_model_name="tiny")) as srv:
        assert httpx.post(srv.url + "/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}}).status_code == 200
        assert httpx.get(srv.url + "/get_server_info").json()["admin_api_key_set"] is True
        for path in ("/flush_cache", "/update_weights_from_disk", "/pause_generation", "/release_memory_occupation", "/abort_request",
                     "/update_weight_version", "/begin_weight_update", "/sleep", "/start_profile"):
            assert httpx.post(srv.url + path, json={}).status_code == 401, path
        assert httpx.post(srv.url + "/flush_cache", headers={"x-api-key": "adm1n"}).status_code == 200
    with ServerThread(create_app(engine, api_key="us3r", admin_api_key="adm1n", served_model_name="tiny")) as srv:
        user, admin = {"Authorization": "Bearer us3r"}, {"Authorization": "Bearer adm1n"}
        assert httpx.post(srv.url + "/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}},
                          headers=admin).status_code == 401  # the admin key is not the API key
        assert httpx.get(srv.url + "/get_model_info", headers=user).status_code == 200
        assert httpx.post(srv.url + "/flush_cache", headers=user).status_code == 401  # nor the API key the admin key
        assert httpx.post(srv.url + "/flush_cache", headers=admin).status_code == 200


def test_batch_logprob_options_per_prompt_and_a_string_rid(http):
    """SGLang's batch forms (io_struct.GenerateReqInput._normalize_logprob_params / _normalize_rid): return_logprob,
    top_logprobs_num and logprob_start_len as one value per prompt, each prompt served its own; a string rid for a
    batch names its prompts `{rid}_{i}`; per-prompt lists with n > 1 are refused, as SGLang refuses them."""
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    r = http.post("/generate", json={"input_ids": ids, "sampling_params": dict(GREEDY, max_new_tokens=3), "rid": "batch",
                                     "return_logprob": [True, False], "top_logprobs_num": [2, 0], "logprob_start_len": [1, 0]})
    assert r.status_code == 200, r.text
    first, second = r.json()
    assert [first["meta_info"]["id"], second["meta_info"]["id"]] == ["batch_0", "batch_1"]
    lp = first["meta_info"]
    assert len(lp["output_token_logprobs"]) == 3 and all(len(top) == 2 for top in lp["output_top_logprobs"])
    assert len(lp["input_token_logprobs"]) == len(ids[0]) - 1  # positions 1..3: the first scored one is null
    assert "output_token_logprobs" not in second["meta_info"] and "input_token_logprobs" not in second["meta_info"]
    # the same prompt alone, with its own options, gives the same tokens and logprobs (to float32 rounding: another batch)
    alone = http.post("/generate", json={"input_ids": ids[0], "sampling_params": dict(GREEDY, max_new_tokens=3), "return_logprob": True,
                                         "top_logprobs_num": 2, "logprob_start_len": 1}).json()["meta_info"]
    for want, got in zip(alone["output_token_logprobs"], lp["output_token_logprobs"], strict=True):
        assert want[1] == got[1] and abs(want[0] - got[0]) < 1e-5
    for field, value in (("return_logprob", [True, True]), ("top_logprobs_num", [1, 1]), ("logprob_start_len", [0, 0])):
        r = http.post("/generate", json={"input_ids": ids, "sampling_params": dict(GREEDY, n=2), field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    r = http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY, "return_logprob": [True]})
    assert r.status_code == 400 and "1 values for 2 prompts" in r.json()["error"]["message"], r.text


def test_abort_by_client_rid_and_engine_id(http, engine):
    """/abort_request reaches a request by the rid its client chose (non-stream and stream) or by meta_info.id."""
    out = abort_while_queued(http, engine, "/generate", {"text": PROMPT, "sampling_params": GREEDY, "rid": "my-rid"}, "my-rid").json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and out["meta_info"]["id"] == "my-rid"
    # a stream: abort by the engine id seen in the first chunk keeps the partial output
    sp = dict(GREEDY, max_new_tokens=400)
    with http.stream("POST", "/generate", json={"text": PROMPT, "sampling_params": sp, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(x for x in lines if x)
        erid = json.loads(first[len("data: "):])["meta_info"]["id"]
        http.post("/abort_request", json={"rid": erid})
        rest = [x for x in lines if x]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2][len("data: "):])
    assert final["meta_info"]["finish_reason"]["type"] in ("abort", "length")
    assert_clean(engine)


# ---- disconnects ------------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_request(server, http, engine):
    """The client reads a few chunks, generation is held so the request cannot finish on its own, the client
    goes away: the server must abort it (no running request, pages back, invariants hold)."""
    sp = {"max_new_tokens": 500, "temperature": 0, "ignore_eos": True}
    before = disconnects(http)
    client = httpx.Client(base_url=server.url, timeout=30)
    with client.stream("POST", "/generate", json={"text": PROMPT, "sampling_params": sp, "stream": True}) as r:
        lines = r.iter_lines()
        got = [x for _, x in zip(range(6), (y for y in lines if y))]
        assert len(got) == 6
        assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
        load = engine.get_load()
        assert load.num_running + load.num_waiting == 1  # held, unfinished
    client.close()  # the connection is gone mid-stream
    try:
        deadline = time.monotonic() + 10
        while True:
            load = engine.get_load()
            if load.num_running == 0 and load.num_waiting == 0:
                break
            assert time.monotonic() < deadline, f"disconnected stream still holds a request: {load}"
            time.sleep(0.02)
    finally:
        assert http.post("/continue_generation").status_code == 200
    assert_clean(engine)
    wait_disconnects(http, before + 1)


def disconnects(http) -> int:
    line = next(x for x in http.get("/metrics").text.splitlines() if x.startswith("hotswap_client_disconnects_total "))
    return int(line.split()[1])


def wait_disconnects(http, expected: int) -> None:
    deadline = time.monotonic() + 30
    while disconnects(http) < expected:
        assert time.monotonic() < deadline, f"disconnect count {disconnects(http)} != {expected}"
        time.sleep(0.02)
    assert disconnects(http) == expected


def test_disconnect_openai_stream_and_nonstream(server, http, engine):
    before = disconnects(http)
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        # non-streaming: the client times out and closes while the request waits
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 50, "n": 2}, timeout=0.5)
        # streaming chat: the client reads the role chunk and leaves
        with httpx.Client(base_url=server.url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                                                                "stream": True}) as r:
                first = next(x for x in r.iter_lines() if x)
                assert "assistant" in first
        deadline = time.monotonic() + 10
        while True:
            load = engine.get_load()
            if load.num_running == 0 and load.num_waiting == 0:
                break
            assert time.monotonic() < deadline, f"requests left behind: {load}"
            time.sleep(0.02)
    finally:
        assert http.post("/continue_generation").status_code == 200
    assert_clean(engine)
    wait_disconnects(http, before + 2)


# ---- auth -------------------------------------------------------------------------------------------


def test_api_key(engine):
    """SGLang's rules (utils/auth.py::decide_request_auth): every route needs the key but the probes (/health*,
    /ready, /metrics) and OPTIONS; it comes as a bearer token or an x-api-key header."""
    with ServerThread(create_app(engine, api_key="s3cret", served_model_name="tiny")) as srv:
        for path in ("/health", "/health_generate", "/metrics"):  # health monitors and Prometheus send no key
            assert httpx.get(srv.url + path, timeout=30).status_code == 200, path
        for method, path in (("GET", "/v1/models"), ("POST", "/generate"), ("GET", "/get_model_info"),
                             ("POST", "/update_weights_from_disk"), ("POST", "/flush_cache"), ("POST", "/abort_request")):
            r = httpx.request(method, srv.url + path, json={})
            assert r.status_code == 401, path
            assert "error" in r.json()
        r = httpx.post(srv.url + "/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 1}},
                       headers={"x-api-key": "s3cret"})
        assert r.status_code == 200, r.text
        assert httpx.post(srv.url + "/flush_cache", headers={"authorization": "bearer s3cret"}).status_code == 200
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(srv.url + "/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 2}},
                       headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2
