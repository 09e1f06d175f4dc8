"""A read-back step's rows handed to their sequences (scheduler/step_output.py `hand_out`, OutputStreamer.append_token)
give each sequence what a plain row-by-row reading of the rules gives, field by field: its token, logprob and top
logprobs (only when it asked), the weight version, the finish reason in SGLang's order (length, then eos and
stop_token_ids unless ignore_eos, then the context limit), the pending count, the streamed outputs, and the rows
it drops (not sampled, finished while the step ran). Greedy batches without logprobs (no logprob list read back)
and sampled ones with top logprobs alike."""

from __future__ import annotations

import random

import pytest
import torch

from hotswap.protocol import GenerateRequest
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.sampler import SampleResult
from hotswap.sampling_params import SamplingParams
from hotswap.scheduler.output_streamer import OutputStreamer
from hotswap.scheduler.overlap import InFlight
from hotswap.scheduler.sequence import Sequence, Status
from hotswap.scheduler.step_output import hand_out

EOS, STOP, MAX_CONTEXT, TOP = 2, 7, 30, 3


def make_step(rng: random.Random, rows: int, logprobs: bool, outputs: list) -> tuple[InFlight, tuple]:
    """A decode step of `rows` sequences with random parameters, lengths and tokens (some eos or a stop id)."""
    seqs, entries = [], []
    for i in range(rows):
        sp = SamplingParams(max_new_tokens=rng.choice([1, 3, 50]), ignore_eos=rng.random() < 0.3, keep_stop_token_ids=rng.random() < 0.5,
                            stop_token_ids=[STOP], return_logprob=logprobs and rng.random() < 0.7,
                            top_logprobs_num=rng.choice([0, 1, TOP]) if logprobs else 0)
        req = GenerateRequest(rid=f"r{i}", input_ids=[5] * rng.choice([4, 27, 28]), sampling_params=sp, seed=i, sink=outputs.append,
                              stream=rng.random() < 0.5)
        seq = Sequence(req=req, status=Status.FINISHED if rng.random() < 0.1 else Status.RUNNING, pending=1)
        seq.output_ids = [9] * rng.randrange(0, 2)
        seq.logprobs, seq.top_logprobs, seq.token_versions = [-1.0] * len(seq.output_ids), [[]] * len(seq.output_ids), ["v0"] * len(seq.output_ids)
        seqs.append(seq)
        entries.append(BatchEntry(input_ids=[5], start_pos=len(req.input_ids), pages=[0], sample=rng.random() < 0.9, params=sp,
                                  row=None, step=len(seq.output_ids)))
    for seq, entry in zip(seqs, entries):
        seq.pending = int(entry.sample)
    n = sum(e.sample for e in entries)
    ids = torch.tensor([rng.choice([EOS, STOP, 11, 12, 13]) for _ in range(n)])
    lps = torch.rand(n) - 1 if logprobs else None
    top_v = torch.rand(n, TOP) - 1 if logprobs else None
    top_i = torch.randint(0, 50, (n, TOP)) if logprobs else None
    result = SampleResult(ids, lps, top_v, top_i)
    result.copy_to_host()
    return InFlight(seqs=seqs, entries=entries, result=result, version="v1"), result.to_lists()


def reference(step: InFlight, tokens: tuple) -> tuple[list, int]:
    """Each row in turn, written out plainly."""
    ids, lps, top_values, top_ids = tokens
    done, generated, k = [], 0, 0
    for seq, entry in zip(step.seqs, step.entries):
        if not entry.sample:
            continue
        row, k = k, k + 1
        seq.pending -= 1
        if seq.status is Status.FINISHED:
            continue
        sp, token = seq.req.sampling_params, ids[row]
        seq.output_ids.append(token)
        if sp.return_logprob:
            seq.logprobs.append(lps[row])
            seq.top_logprobs.append(list(zip(top_values[row], top_ids[row]))[: sp.top_logprobs_num] if sp.top_logprobs_num else [])
        seq.token_versions.append(step.version)
        if len(seq.output_ids) >= sp.max_new_tokens:
            seq.finish_reason = {"type": "length", "length": sp.max_new_tokens}
        elif not sp.ignore_eos and token == EOS:
            seq.finish_reason = {"type": "stop", "matched": token}
        elif (not sp.ignore_eos or sp.keep_stop_token_ids) and token == STOP:
            seq.finish_reason = {"type": "stop", "matched": token}
        elif len(seq.req.input_ids) + len(seq.output_ids) >= MAX_CONTEXT:
            seq.finish_reason = {"type": "length", "length": len(seq.output_ids)}
        if seq.finish_reason is None and seq.req.stream:
            seq.req.sink((seq.rid, seq.output_ids[seq.sent_tokens:], seq.logprobs[seq.sent_tokens:], seq.top_logprobs[seq.sent_tokens:]))
            seq.sent_tokens = len(seq.output_ids)
        generated += 1
        if seq.finish_reason is not None:
            done.append(seq)
    return done, generated


def fields(seq: Sequence) -> tuple:
    return (seq.output_ids, seq.logprobs, seq.top_logprobs, seq.token_versions, seq.finish_reason, seq.pending, seq.sent_tokens)


@pytest.mark.parametrize("logprobs", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_hand_out_gives_each_row_what_the_row_by_row_rules_give(seed, logprobs):
    streamer = OutputStreamer(tokenizer=None, eos_token_ids=frozenset([EOS]), max_context_len=MAX_CONTEXT)
    sent, expected_sent = [], []
    step, tokens = make_step(random.Random(seed), 64, logprobs, sent)
    twin, _ = make_step(random.Random(seed), 64, logprobs, expected_sent)
    done, generated = hand_out(step, tokens, streamer)
    want_done, want_generated = reference(twin, tokens)
    assert generated == want_generated and [s.rid for s in done] == [s.rid for s in want_done]
    assert any(s.finish_reason for s in want_done) and want_generated < 64  # finishes happen, some rows are dropped
    for i, (seq, want) in enumerate(zip(step.seqs, twin.seqs)):
        assert fields(seq) == fields(want), f"row {i}"
    assert [(o.rid, o.new_token_ids, o.new_logprobs, o.new_top_logprobs) for o in sent] == expected_sent
    assert sent and all(not o.finished for o in sent)
