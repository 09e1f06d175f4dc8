"""Streamed chunks under load: when a consumer's loop is behind, the outputs of several scheduler steps for one
request wait for it; they go out as one chunk (every token, logprob and version once, the text decoded once
and right across a character split between steps), in process and through the front end's pipe. Also the
front end's JSON encoder (orjson, with `json` for what it cannot encode)."""

from __future__ import annotations

import asyncio
import collections
import datetime
import gc
import json
import math
import multiprocessing as mp
import pickle
import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from hotswap import protocol as p
from hotswap.cache.page_allocator import PoolCapacity
from hotswap.config import EngineConfig, model_config_for
from hotswap.engine.api import EngineAPI
from hotswap.engine.remote import RemoteEngine
from hotswap.engine.service import EngineInfo, output_rows, outputs_from_rows
from hotswap.engine.tokenizer import load_tokenizer
from hotswap.gc_policy import GC_FIRST_THRESHOLD
from hotswap.scheduler.detokenizer import detokenizer_for
from hotswap.server.app import create_app
from hotswap.server.http_utils import dumps, sse

CAPACITY = PoolCapacity(num_pages=64, page_size=16)


class ScriptedScheduler:
    """A SchedulerPort whose generate requests produce what the test emits, step by step, as the Scheduler
    hands outputs over: each output to its request's sink, then each consumer's flush once."""

    def __init__(self):
        self.requests: list[p.GenerateRequest] = []
        self.submitted = threading.Event()

    def capacity(self) -> PoolCapacity:
        return CAPACITY

    def submit(self, request) -> Future:
        fut: Future = Future()
        if isinstance(request, p.GenerateBatch):
            self.requests += request.requests
            self.submitted.set()
        fut.set_result(None)
        return fut

    def step(self, out: p.GenerateOutput) -> None:
        req = self.requests[0]
        req.sink(out)
        req.flush()


class CountingDetokenizer:
    """The real incremental detokenizer, counting its calls."""

    calls = 0

    def __init__(self, inner):
        self.inner = inner

    def step(self, ids: list[int]) -> str:
        CountingDetokenizer.calls += 1
        return self.inner.step(ids)

    def rest(self, ids: list[int]) -> str:
        return self.inner.rest(ids)


def output(rid: str, ids: list[int], *, done: int, finished: bool = False, text: str = "", version: str = "v1") -> p.GenerateOutput:
    """One step's output (`text`: a finished output's full text, which the scheduler sends with it)."""
    return p.GenerateOutput(rid=rid, new_token_ids=ids, new_logprobs=[-0.25 * (done + k + 1) for k in range(len(ids))],
                            new_top_logprobs=[], new_token_versions=[version] * len(ids), text_delta=text, finished=finished,
                            finish_reason={"type": "length", "length": done + len(ids)} if finished else None, prompt_tokens=3,
                            cached_tokens=0, weight_version=version)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return load_tokenizer(EngineConfig(model_path=str(tiny_qwen3)))


@pytest.fixture
def scripted(tiny_qwen3, tokenizer):
    config = EngineConfig(model_path=str(tiny_qwen3), device="cpu", incremental_streaming_output=True)
    scheduler = ScriptedScheduler()
    api = EngineAPI(config, model_config_for(config), torch.device("cpu"), tokenizer, scheduler,
                    lambda skip, prompt_ids: CountingDetokenizer(detokenizer_for(tokenizer, skip, prompt_ids)))
    CountingDetokenizer.calls = 0
    return api, scheduler


def steps_of(tokenizer, text: str) -> tuple[list[int], list[list[int]]]:
    """`text`'s ids, one per step, the first character's bytes split between two steps."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids[:1]) == "\ufffd", "the test needs a first character split over two tokens"
    return ids, [[t] for t in ids]


def test_outputs_of_several_steps_waiting_for_the_loop_go_out_as_one_chunk(scripted, tokenizer):
    """Three steps (a character split between the first two) reach the loop together: one chunk, decoded once;
    the last step's chunk ends the stream with the scheduler's final text and the right meta_info."""
    api, scheduler = scripted
    ids, steps = steps_of(tokenizer, "é!x")

    async def main() -> list[dict]:
        stream = await api.async_generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": len(ids)}, return_logprob=True,
                                          stream=True)
        first = asyncio.ensure_future(anext(stream))
        while not scheduler.requests:
            await asyncio.sleep(0)
        rid = scheduler.requests[0].rid
        for k, step in enumerate(steps[:-1]):  # every step handed over before the loop runs the consumer again
            scheduler.step(output(rid, step, done=k))
        chunks = [await first]
        scheduler.step(output(rid, steps[-1], done=len(ids) - 1, finished=True, text=tokenizer.decode(ids)))
        return chunks + [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert len(chunks) == 2
    assert chunks[0]["output_ids"] == chunks[0]["delta_output_ids"] == ids[:-1]
    assert chunks[0]["text"] == chunks[0]["delta_text"] == "é!"
    assert chunks[0]["meta_info"]["output_token_logprobs"] == [(-0.25 * (k + 1), t, None) for k, t in enumerate(ids[:-1])]
    assert chunks[0]["meta_info"]["completion_tokens"] == len(ids) - 1 and chunks[0]["meta_info"]["finish_reason"] is None
    assert CountingDetokenizer.calls == 1  # one decode for the three steps
    last = chunks[1]
    assert last["output_ids"] == last["delta_output_ids"] == ids[-1:] and last["text"] == last["delta_text"] == "x"
    meta = last["meta_info"]
    assert meta["output_token_logprobs"] == [(-0.25 * len(ids), ids[-1], None)]
    assert meta["completion_tokens"] == len(ids) and meta["finish_reason"] == {"type": "length", "length": len(ids)}
    assert "e2e_latency" in meta and last["delta_weight_versions"] == ["v1"]


def test_a_coalesced_chunk_is_decoded_once_and_a_split_character_waits_for_its_last_byte(scripted, tokenizer):
    """Steps 1-3 reach the loop together (one chunk, one decode); then the first byte of a split character
    arrives alone (no text yet) and its last byte completes it in the next chunk."""
    api, scheduler = scripted
    head = tokenizer.encode("ab c", add_special_tokens=False)
    split = tokenizer.encode("é", add_special_tokens=False)
    assert len(split) == 2

    async def main() -> list[dict]:
        stream = await api.async_generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 16}, return_logprob=True,
                                          stream=True, incremental_streaming_output=True)
        got, nxt = [], asyncio.ensure_future(anext(stream))
        while not scheduler.requests:
            await asyncio.sleep(0)
        rid = scheduler.requests[0].rid
        for k, t in enumerate(head):
            scheduler.step(output(rid, [t], done=k))
        got.append(await nxt)
        for k, t in enumerate(split):
            scheduler.step(output(rid, [t], done=len(head) + k))
            got.append(await anext(stream))
        await stream.aclose()
        return got

    chunks = asyncio.run(main())
    assert [c["delta_output_ids"] for c in chunks] == [head, split[:1], split[1:]]
    assert [c["delta_text"] for c in chunks] == ["ab c", "", "é"]
    assert [c["text"] for c in chunks] == ["ab c", "", "é"]  # incremental: each chunk's own text
    assert [[e[1] for e in c["meta_info"]["output_token_logprobs"]] for c in chunks] == [head, split[:1], split[1:]]
    assert CountingDetokenizer.calls == 3  # one decode per chunk, not one per step


def test_outputs_queued_on_the_pipe_while_the_loop_is_busy_go_out_as_one_chunk(tiny_qwen3, tokenizer):
    """The front end in its own process: several step messages read off the pipe while its loop is busy are
    one chunk, in SGLang's cumulative shape (everything so far)."""
    config = EngineConfig(model_path=str(tiny_qwen3), device="cpu")
    ours, theirs = mp.Pipe(duplex=True)
    remote = RemoteEngine(theirs, EngineInfo(config=config, model_config=model_config_for(config), device="cpu",
                                             model_path=str(tiny_qwen3), capacity=CAPACITY, accelerator=None))
    ids = tokenizer.encode("é!x yz", add_special_tokens=False)
    try:
        async def main() -> list[dict]:
            stream = await remote.async_generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": len(ids)}, return_logprob=True,
                                                 stream=True)
            first = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0)
            assert ours.poll(5)
            _, batch = ours.recv()
            rid = batch.requests[0].rid
            for k, t in enumerate(ids[:-1]):
                ours.send(("outputs", output_rows([output(rid, [t], done=k)]), []))
            # a control call answered after them: once its reply is read, so are they (the pipe is in order), and the
            # loop, blocked here meanwhile, has not run the consumer yet
            probe = remote.scheduler.submit(p.GetLoadRequest())
            call_id, _ = ours.recv()
            ours.send(("reply", call_id, p.LoadOutput(success=True, message=""), None))
            probe.result(timeout=5)
            chunk = await first
            ours.send(("outputs", output_rows([output(rid, ids[-1:], done=len(ids) - 1, finished=True, text=tokenizer.decode(ids))]), []))
            return [chunk] + [c async for c in stream]

        chunks = asyncio.run(main())
    finally:
        remote.shutdown()
        ours.close()
    assert len(chunks) == 2
    assert chunks[0]["output_ids"] == ids[:-1] and chunks[0]["text"] == tokenizer.decode(ids[:-1])
    assert chunks[1]["output_ids"] == ids and chunks[1]["delta_output_ids"] == ids[-1:]
    assert [e[1] for e in chunks[1]["meta_info"]["output_token_logprobs"]] == ids
    assert chunks[1]["meta_info"]["finish_reason"] == {"type": "length", "length": len(ids)}


def test_the_json_encoder_writes_what_json_writes():
    """Non-finite floats as null, ints past 64 bits, non-string keys, numpy floats as numbers, namedtuples as
    arrays, dataclasses and datetimes as their str (json.dumps(default=str)'s reading of them)."""
    obj = {"lp": [float("nan"), -math.inf, -0.5, 1e-05], "big": 2**70, 3: "three", "t": ("é", None)}
    assert json.loads(dumps(obj)) == {"lp": [None, None, -0.5, 1e-05], "big": 2**70, "3": "three", "t": ["é", None]}
    assert json.loads(dumps({"lp": [math.inf], 1: 2})) == {"lp": [None], "1": 2}
    pair = collections.namedtuple("pair", "lp tid")
    when = datetime.datetime(2026, 12, 5, 9, 30)
    odd = {"np": [np.float64(-0.5), np.float64("nan")], "nt": pair(-1.5, 7), "dc": CAPACITY, "at": when}
    assert json.loads(dumps(odd)) == {"np": [-0.5, None], "nt": [-1.5, 7], "dc": str(CAPACITY), "at": str(when)}
    chunk = {"text": "é\u2028", "meta_info": {"output_token_logprobs": [(-0.1, 5, None)], "finish_reason": None}}
    raw = sse(chunk)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and b"\n" not in raw[:-2]
    assert json.loads(raw[len(b"data: "):]) == {"text": "é\u2028", "meta_info": {"output_token_logprobs": [[-0.1, 5, None]], "finish_reason": None}}


def test_step_outputs_cross_the_pipe_as_field_tuples_and_come_back_equal():
    """Every field survives (input logprobs, routing, top-p ids, a finish reason); the rows pickle smaller than
    the dataclasses, which the engine's process would otherwise pickle under the scheduler's interpreter lock."""
    full = p.GenerateOutput(rid="r1", new_token_ids=[4, 5], new_logprobs=[-0.5, -1.5], new_top_logprobs=[[(-0.5, 4), (-2.0, 9)], [(-1.5, 5)]],
                            new_token_versions=["v1", "v2"], text_delta="ab", finished=True, finish_reason={"type": "stop", "matched": 5},
                            prompt_tokens=7, cached_tokens=3, weight_version="v2", routed_experts=b"\x01\x00\x00\x00",
                            input_token_logprobs=[(None, 1), (-0.25, 2)], input_top_logprobs=[None, [(-0.25, 2)]],
                            new_top_p_token_ids=[[4, 9], [5]])
    plain = output(rid="r2", ids=[8], done=0)
    rows = output_rows([full, plain])
    assert all(type(row) is tuple for row in rows)
    assert outputs_from_rows(pickle.loads(pickle.dumps(rows, protocol=5))) == [full, plain]
    step = [output(rid=f"r{k}", ids=[k], done=3) for k in range(64)]
    assert len(pickle.dumps(output_rows(step), protocol=5)) < len(pickle.dumps(step, protocol=5))


def test_serving_makes_full_garbage_collections_rare_unless_the_collector_is_off(scripted):
    """Streaming allocates per token; with CPython's default first threshold the collector's full passes over the
    whole process cost more than the streaming (GC_FIRST_THRESHOLD's note). The other thresholds are kept, and a
    collector turned off stays off."""
    api, _ = scripted
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        create_app(api)
        assert gc.get_threshold() == (GC_FIRST_THRESHOLD, 10, 10)
        gc.set_threshold(0, 10, 10)
        create_app(api)
        assert gc.get_threshold() == (0, 10, 10)
    finally:
        gc.set_threshold(*saved)
