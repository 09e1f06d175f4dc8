"""What one prefill step costs beyond the model: the LM head runs on the rows that sample (never on every
prompt position), nothing waits on the device inside the step, and a batch's request preparation checks
its shared sampling parameters once. Asserted on the ops a step dispatches, not on time."""

from __future__ import annotations

import enum
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hotswap.config import EngineConfig, ModelConfig
from hotswap.engine.request_prep import RequestPrep
from hotswap.errors import HotswapError
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.model_runner import ModelRunner
from hotswap.runner.row_params import SamplerRow
from hotswap.sampling_params import SamplingParams

PAGE = 4
# ops that make the host wait for the device (a value read back, or a data-dependent shape)
HOST_SYNCS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default", "aten.is_nonzero.default",
              "aten.equal.default", "aten.unique2.default", "aten._unique2.default", "aten.masked_select.default"}


class OpLog(TorchDispatchMode):
    """Every aten op dispatched in this thread: (name, output shapes), views left out (they copy nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.ops.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out


def runner_for(path, device: str) -> ModelRunner:
    cfg = EngineConfig(model_path=str(path), device=device, page_size=PAGE, num_pages=64, max_running_requests=8)
    return ModelRunner(cfg, ModelConfig.from_pretrained(str(path)), torch.device(device))


def prefill_entries(sp: SamplingParams) -> list[BatchEntry]:
    """Three whole prompts that sample their first token and the first chunk of a fourth, which does not."""
    lengths, pages, entries = (13, 9, 16, 8), 0, []
    for i, n in enumerate(lengths):
        need = -(-(n + 1) // PAGE)
        entries.append(BatchEntry(input_ids=[3 + (5 * i + j) % 200 for j in range(n)], start_pos=0, pages=list(range(pages, pages + need)),
                                  sample=i < 3, params=sp, row=SamplerRow.of(sp, i), step=0))
        pages += need
    return entries


def logit_rows(log: OpLog, vocab: int) -> list[int]:
    """Rows of every vocabulary-wide tensor an op made (logits and anything computed from them)."""
    return [s[0] if len(s) > 1 else 1 for _, shapes in log.ops for s in shapes if s and s[-1] == vocab]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_prefill_step_computes_logits_for_its_sampled_rows_only_and_never_waits_on_the_device(tiny_qwen3, device):
    runner = runner_for(tiny_qwen3, device)
    vocab = runner.model_config.vocab_size
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    runner.run(prefill_entries(greedy))  # first launches, graphs' first use
    log = OpLog()
    with log:
        result = runner.run(prefill_entries(greedy))
    rows = logit_rows(log, vocab)
    assert rows and max(rows) == 3, f"vocabulary-wide tensors with {sorted(set(rows))} rows; 3 rows sample (of 46 tokens)"
    syncs = [op for op, _ in log.ops if op in HOST_SYNCS]
    assert not syncs, f"the step waits on the device: {syncs}"
    assert len(result.to_lists()[0]) == 3


def test_a_step_scoring_prompt_logprobs_computes_logits_for_those_rows_too(tiny_qwen3):
    """The one reason a prefill step computes more logits than it samples: prompt logprobs asked for."""
    runner = runner_for(tiny_qwen3, "cpu")
    sp = SamplingParams(temperature=0.0, max_new_tokens=4, return_logprob=True, logprob_start_len=0)
    entries = prefill_entries(sp)
    entries[1].prompt_targets = entries[1].input_ids[1:]  # prompt 1 scores positions 0..7 (8 rows)
    log = OpLog()
    with log:
        result = runner.run(entries)
    assert max(logit_rows(log, runner.model_config.vocab_size)) == 3 + 8
    assert len(result.prompt_lists()[0]) == 8


def test_one_sampling_dict_for_a_batch_is_checked_once_and_shared(monkeypatch):
    checks = []
    real = SamplingParams.validate
    monkeypatch.setattr(SamplingParams, "validate", lambda self: (checks.append(self), real(self))[1])
    prep = RequestPrep(encode=lambda text: [], vocab_size=1000, max_context_len=512, seed=0)
    prompts = [[5 + i, 6, 7] for i in range(64)]
    call = prep.prepare(None, {"max_new_tokens": 4, "temperature": 0.7}, prompts, return_logprob=True, top_logprobs_num=2)
    params = {id(r.sampling_params) for r in call.requests}
    assert len(call.requests) == 64 and len(params) == 1
    assert call.requests[0].sampling_params.return_logprob and call.requests[0].sampling_params.top_logprobs_num == 2
    assert len(checks) <= 3, f"validated {len(checks)} times for one dict"  # from_dict, then once after the merge
    # a list of dicts is still one SamplingParams per prompt, each checked
    call = prep.prepare(None, [{"max_new_tokens": 4, "seed": i} for i in range(4)], prompts[:4])
    assert [r.sampling_params.seed for r in call.requests] == [0, 1, 2, 3]


def test_requests_without_a_seed_draw_theirs_from_the_engine_seed_in_request_order():
    """Drawn for a whole call at once (RequestPrep._draw_seeds): the same seeds, in the same order, as one draw per request."""
    prep = RequestPrep(encode=lambda text: [], vocab_size=1000, max_context_len=512, seed=3)
    rng = random.Random(3)
    first = prep.prepare(None, [{"max_new_tokens": 1, "n": 2}, {"max_new_tokens": 1, "seed": 40, "n": 2}, {"max_new_tokens": 1}],
                         [[5], [6], [7]])
    second = prep.prepare(None, {"max_new_tokens": 1}, [[5], [6]])
    expected = [rng.getrandbits(62), rng.getrandbits(62), 40, 41, rng.getrandbits(62), rng.getrandbits(62), rng.getrandbits(62)]
    assert [r.seed for r in first.requests + second.requests] == expected


class Token(enum.IntEnum):
    A = 7


@pytest.mark.parametrize("ids, ok", [
    ([5, 6, 999], True), ([5, Token.A], True),  # an int subclass other than bool is a token id, as before
    ([5, True], False), ([5, 6.0], False), ([5, -1], False), ([5, 1000], False), ([5, "6"], False), ([5, None], False),
])
def test_prompt_token_ids_are_checked_one_by_one_whatever_their_types(ids, ok):
    prep = RequestPrep(encode=lambda text: [], vocab_size=1000, max_context_len=512, seed=0)
    if ok:
        assert prep.prepare(None, {"max_new_tokens": 1}, [ids]).requests[0].input_ids == ids
    else:
        with pytest.raises(HotswapError, match="prompt 0 holds token ids outside the vocabulary"):
            prep.prepare(None, {"max_new_tokens": 1}, [ids])
