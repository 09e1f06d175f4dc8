"""The one place a generate call becomes engine requests: prompts -> token ids, sampling parameters
normalised and validated, prompts x n fanned out with their seeds. The Engine and the HTTP server both go
through `RequestPrep.prepare`, so a bad value is refused the same way (a HotswapError naming the field)
on every path, streaming or not, before anything reaches the scheduler."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from hotswap.errors import HotswapError, SamplingParamsError, shown
from hotswap.sampling_params import CONSTRAINED_DECODING_FIELDS, INT64_MAX, SamplingParams, is_seed

_PLAIN_INT = {int}
MAX_RID_CHARS = 1024


def _drop_neutral(params: dict) -> dict:
    """SGLang sampling parameters that SamplingParams lacks, which frameworks send at their neutral value
    (any other value stays and is refused by name, never silently ignored): unset constrained-decoding
    fields (None, "", {}; set, SamplingParams refuses them by name), and `spaces_between_special_tokens`
    (a boolean, None its default): a fast tokenizer's decode has no such option (SGLang's, with a fast tokenizer, ignores
    it)."""
    spaces = params.get("spaces_between_special_tokens")
    if spaces is not None and not isinstance(spaces, bool):
        raise SamplingParamsError(f"invalid sampling parameter: spaces_between_special_tokens must be a boolean, got {shown(spaces)}")
    return {k: v for k, v in params.items()
            if k != "spaces_between_special_tokens" and not (k in CONSTRAINED_DECODING_FIELDS and not v)}


def _map_distinct(sps: list[SamplingParams], fn: Callable[[SamplingParams], SamplingParams]) -> list[SamplingParams]:
    """`fn` of each SamplingParams, computed once per distinct object: one dict for a whole batch is one object
    shared by every prompt, so a batch of 64 is validated (and merged with top-level fields) once, not 64 times,
    and stays shared."""
    done: dict[int, SamplingParams] = {}
    out = []
    for sp in sps:
        if id(sp) not in done:
            done[id(sp)] = fn(sp)
        out.append(done[id(sp)])
    return out


def _per_prompt(name: str, value, count: int, sps: list[SamplingParams], check: Callable[[object], None]) -> list:
    """`value` for each of `count` prompts, each checked by `check` (raises naming a bad one): one value for all
    (checked once: a batch of 64 is one value), or SGLang's list of one per prompt, which (as in SGLang) cannot be
    fanned out over n samples."""
    if not isinstance(value, list):
        check(value)
        return [value] * count
    if len(value) != count:
        raise HotswapError(f"{name}: {len(value)} values for {count} prompts")
    if any(sp.n > 1 for sp in sps):
        raise HotswapError(f"{name} as a list of per-prompt values needs n == 1 (SGLang's rule)")
    for v in value:
        check(v)
    return value


def _check_return_logprob(value: object) -> None:
    if not isinstance(value, bool):
        raise HotswapError(f"return_logprob must be a boolean, got {shown(value)}")


def _check_top_logprobs_num(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SamplingParamsError(f"invalid top_logprobs_num: must be an integer >= 0, got {shown(value)}")


def _check_logprob_start_len(value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < -1):
        raise SamplingParamsError(f"invalid logprob_start_len: must be -1 or an integer >= 0, got {shown(value)}")


def _gives_max_new_tokens(params) -> bool:
    """The caller set max_new_tokens (to a number): SGLang then refuses a prompt + max_new_tokens over the
    context instead of cutting the generation short at it."""
    return isinstance(params, SamplingParams) or (isinstance(params, dict) and params.get("max_new_tokens") is not None)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """One engine request (one sample of one prompt)."""

    input_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    rid: str | None = None  # the client's request id (SGLang's `rid`): the engine's id for it, in `meta_info.id`
    group: str | None = None  # the client's rid of the prompt whose n samples this is one of (aborting it aborts them all)


@dataclass(slots=True)
class PreparedCall:
    requests: list[PreparedRequest]
    single: bool  # one prompt given bare with n == 1: the caller gets one dict, not a list


@dataclass(kw_only=True, slots=True)
class RequestPrep:
    encode: Callable[[str], list[int]]  # text -> token ids (Engine.encode)
    has_tokenizer: bool = True  # False under skip_tokenizer_init: stop strings, matched in text, are refused (SGLang's rule)
    vocab_size: int
    max_context_len: int
    seed: int  # the engine's seed: requests without one draw theirs from it
    allow_auto_truncate: bool = False  # SGLang's: a max_new_tokens past the context is cut to fit, not refused
    routed_experts_enabled: bool = False  # the engine keeps routed experts (enable_return_routed_experts): requests may ask
    _rng: random.Random = field(init=False)
    _rng_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def prepare(self, prompt=None, sampling_params=None, input_ids=None, return_logprob: bool | list[bool] = False,
                top_logprobs_num: int | list[int] = 0, return_routed_experts: bool = False,
                logprob_start_len: int | list[int | None] | None = None, routed_experts_start_len: int = 0,
                rid: str | list[str] | None = None) -> PreparedCall:
        """Validate everything up front; raises HotswapError on bad input and submits nothing.
        `logprob_start_len` (SGLang's): prompt logprobs from that position (None or -1: none). `return_logprob`,
        `top_logprobs_num` and `logprob_start_len` are one value for every prompt or, as SGLang takes them, a list
        of one per prompt (with n == 1)."""
        if prompt is None and input_ids is None:
            raise HotswapError("give a prompt or input_ids")
        if prompt is not None and input_ids is not None:  # SGLang's rule: the token ids run, the text is not tokenized
            shapes = [(single, len(lists)) for lists, single in (self._token_ids(prompt, None, encode=False), self._token_ids(None, input_ids))]
            if shapes[0] != shapes[1]:
                raise HotswapError("prompt and input_ids disagree in shape: give one prompt with one list of token ids, "
                                   "or as many prompts as lists")
            prompt = None
        id_lists, single = self._token_ids(prompt, input_ids)
        sps = self._sampling_params(sampling_params, len(id_lists), return_logprob, top_logprobs_num, return_routed_experts,
                                    routed_experts_start_len)
        starts = _per_prompt("logprob_start_len", logprob_start_len, len(id_lists), sps, _check_logprob_start_len)
        if len(set(starts)) == 1:
            if starts[0] is not None:
                sps = _map_distinct(sps, lambda sp: dataclasses.replace(sp, logprob_start_len=starts[0]))
        else:
            sps = [sp if start is None else dataclasses.replace(sp, logprob_start_len=start) for sp, start in zip(sps, starts)]
        rids = self._rids(rid, len(id_lists), single)
        raw = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        for i, (ids, sp) in enumerate(zip(id_lists, sps)):
            self._check_prompt(i, ids)
            if _gives_max_new_tokens(raw[i]) and len(ids) + sp.max_new_tokens > self.max_context_len and not self.allow_auto_truncate:
                raise SamplingParamsError(f"prompt {i} has {len(ids)} tokens and max_new_tokens is {sp.max_new_tokens}: "
                                          f"{len(ids) + sp.max_new_tokens} exceeds the context length {self.max_context_len} "
                                          "(allow_auto_truncate on the engine, --allow-auto-truncate on the server, cuts it to fit)")
            # SGLang's scheduler (handle_generate_request): ignored without return_logprob; up to the prompt's length (which
            # scores no prompt token), a start past it refused
            if sp.return_logprob and sp.logprob_start_len > len(ids):
                raise SamplingParamsError(f"invalid logprob_start_len: {sp.logprob_start_len} is past the end of prompt {i} "
                                          f"({len(ids)} tokens)")
            if sp.routed_experts_start_len > len(ids):  # SGLang's range: [0, prompt tokens]
                raise HotswapError(f"routed_experts_start_len {sp.routed_experts_start_len} is past the end of prompt {i} "
                                   f"({len(ids)} tokens)")
        requests = []
        ones = _map_distinct(sps, lambda sp: dataclasses.replace(sp, n=1) if sp.n != 1 else sp)  # what each sample runs
        drawn = iter(self._draw_seeds(sum(sp.n for sp in sps if sp.seed is None)))  # in request order, as drawn one by one
        for i, (ids, sp, one) in enumerate(zip(id_lists, sps, ones)):
            for k in range(sp.n):
                seed = sp.seed + k if sp.seed is not None else next(drawn)
                # n samples of one rid: the first keeps it, the others are `rid-k`
                sample_rid = None if rids[i] is None else rids[i] if k == 0 else f"{rids[i]}-{k}"
                requests.append(PreparedRequest(input_ids=ids, sampling_params=one, seed=seed, rid=sample_rid,
                                                group=rids[i] if sp.n > 1 else None))
        return PreparedCall(requests=requests, single=single and sps[0].n == 1)

    @staticmethod
    def _rids(rid, count: int, single: bool) -> list[str | None]:
        """One client rid per prompt (SGLang: a string for one prompt, a list for a batch, or a string for a batch,
        whose prompts are then `{rid}_{i}`), or none."""
        if rid is None:
            return [None] * count
        if isinstance(rid, str) and rid:
            rids = [rid] if single else [f"{rid}_{i}" for i in range(count)]
        else:
            rids = rid
        if not isinstance(rids, (list, tuple)) or len(rids) != count or not all(isinstance(r, str) and r for r in rids):
            raise HotswapError(f"rid must be a non-empty string for one prompt or a list of {count} such strings, got {shown(rid)}")
        if any(len(r) > MAX_RID_CHARS for r in rids):  # a rid rides on every output of its request, each step
            raise HotswapError(f"rid must be at most {MAX_RID_CHARS} characters, got {max(map(len, rids))}")
        if len(set(rids)) != len(rids):
            raise HotswapError(f"rid holds duplicates: {shown(rid)}")
        return list(rids)

    def _token_ids(self, prompt, input_ids, encode: bool = True) -> tuple[list[list[int]], bool]:
        """The prompts' token ids and whether one bare prompt was given (`encode=False`: empty lists, for the
        shape only)."""
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
            if prompts is None or not all(isinstance(x, str) for x in prompts):
                raise HotswapError("prompt must be a string or a list of strings")
            id_lists = [self.encode(x) if encode else [] for x in prompts]
        else:
            if not isinstance(input_ids, (list, tuple)):
                raise HotswapError("input_ids must be a list of token ids or a list of such lists")
            single = not input_ids or not isinstance(input_ids[0], (list, tuple))
            id_lists = [list(input_ids)] if single else [list(x) if isinstance(x, (list, tuple)) else x for x in input_ids]
            if not all(isinstance(x, list) for x in id_lists):
                raise HotswapError("input_ids must be a list of token ids or a list of such lists")
        if not id_lists:
            raise HotswapError("empty batch: no prompt given")
        return id_lists, single

    def _sampling_params(self, sampling_params, count: int, return_logprob, top_logprobs_num,
                         return_routed_experts: bool, routed_experts_start_len: int) -> list[SamplingParams]:
        if isinstance(sampling_params, list):
            if len(sampling_params) != count:
                raise HotswapError(f"{len(sampling_params)} sampling_params for {count} prompts")
            sps = [SamplingParams.from_dict(self._from_sglang(sp)) for sp in sampling_params]
        else:
            sps = [SamplingParams.from_dict(self._from_sglang(sampling_params))] * count
        wants = _per_prompt("return_logprob", return_logprob, count, sps, _check_return_logprob)
        tops = _per_prompt("top_logprobs_num", top_logprobs_num, count, sps, _check_top_logprobs_num)
        merged = bool(any(wants) or any(tops) or return_routed_experts or routed_experts_start_len)  # new objects below
        # top_logprobs_num is merged (and so range-checked) whatever return_logprob says; without return_logprob it asks
        # for nothing (SGLang: Req.return_logprob gates every logprob, TokenizerManager adds none to meta_info) and
        # `_checked` drops it once checked
        if len(set(wants)) == 1 and len(set(tops)) == 1:  # one value for the batch: each distinct object once
            if wants[0] or tops[0]:
                sps = _map_distinct(sps, lambda sp: dataclasses.replace(sp, return_logprob=sp.return_logprob or wants[0],
                                                                        top_logprobs_num=max(sp.top_logprobs_num, tops[0])))
        else:  # SGLang's per-prompt values
            sps = [dataclasses.replace(sp, return_logprob=sp.return_logprob or want, top_logprobs_num=max(sp.top_logprobs_num, top))
                   if want or top else sp for sp, want, top in zip(sps, wants, tops)]
        if not isinstance(return_routed_experts, bool):
            raise HotswapError(f"return_routed_experts must be a boolean, got {shown(return_routed_experts)}")
        if return_routed_experts:
            sps = _map_distinct(sps, lambda sp: dataclasses.replace(sp, return_routed_experts=True))
        if not isinstance(routed_experts_start_len, int) or isinstance(routed_experts_start_len, bool) or routed_experts_start_len < 0:
            raise HotswapError(f"routed_experts_start_len must be an integer >= 0, got {shown(routed_experts_start_len)}")
        if routed_experts_start_len:
            sps = _map_distinct(sps, lambda sp: dataclasses.replace(sp, routed_experts_start_len=routed_experts_start_len))
        if any(sp.routed_experts_start_len and not sp.return_routed_experts for sp in sps):
            raise HotswapError("routed_experts_start_len needs return_routed_experts")
        if any(sp.return_routed_experts for sp in sps) and not self.routed_experts_enabled:
            raise HotswapError("return_routed_experts needs an engine started with enable_return_routed_experts=True")
        return _map_distinct(sps, lambda sp: self._checked(sp, revalidate=merged))

    def _checked(self, sp: SamplingParams, revalidate: bool) -> SamplingParams:
        """`sp` (from_dict validated it) checked against this engine; `revalidate`: top-level fields were merged in
        since (a merged top_logprobs_num may be out of range)."""
        if revalidate:
            sp.validate()
        if sp.stop and not self.has_tokenizer:  # SGLang's words (sampling_params.py::raise_if_tokenizer_required)
            raise SamplingParamsError(f"stop={sp.stop!r} is unavailable when skip_tokenizer_init=True "
                                      "(requires tokenizer to decode tokens to text for matching).")
        if sp.top_logprobs_num > self.vocab_size:
            raise SamplingParamsError(f"invalid top_logprobs_num: {sp.top_logprobs_num} exceeds the vocabulary ({self.vocab_size})")
        if sp.seed is not None and sp.seed + sp.n - 1 > INT64_MAX:
            raise SamplingParamsError(f"invalid sampling parameter: seed must be below 2**63 - n + 1, got {shown(sp.seed)}")
        for name, ids in (("logit_bias", sp.logit_bias), ("stop_token_ids", sp.stop_token_ids)):  # both index the logits
            if any(t >= self.vocab_size for t in ids):
                raise SamplingParamsError(f"invalid sampling parameter: {name} names a token id outside the vocabulary [0, {self.vocab_size})")
        if sp.top_k >= self.vocab_size:  # the whole vocabulary: the same as off
            sp = dataclasses.replace(sp, top_k=-1)
        if sp.top_logprobs_num and not sp.return_logprob:  # checked above; without return_logprob it asks for nothing
            sp = dataclasses.replace(sp, top_logprobs_num=0)
        return sp

    def _from_sglang(self, params):
        """An SGLang sampling_params dict as SamplingParams.from_dict takes it: neutral fields dropped,
        `sampling_seed` (SGLang's per-request seed; AReaL sends it) read as `seed`, and max_new_tokens None
        (SGLang: until the context is full) as the context length (the context ends it)."""
        if not isinstance(params, dict):
            return params
        params = _drop_neutral(params)
        if "sampling_seed" in params:
            seed = params.pop("sampling_seed")
            if seed is not None and not is_seed(seed):
                raise SamplingParamsError(f"invalid sampling parameter: sampling_seed must be an integer in [0, 2**63), got {shown(seed)}")
            if seed is not None and params.get("seed") is None:
                params["seed"] = seed
        if "max_new_tokens" in params and params["max_new_tokens"] is None:
            params["max_new_tokens"] = self.max_context_len
        return params

    def _check_prompt(self, i: int, ids: list) -> None:
        if not ids:
            raise HotswapError(f"prompt {i} is empty")
        vocab = self.vocab_size
        # plain ints (every prompt of a well-formed call) in C-level passes; anything else (a bool, an int
        # subclass, a float) token by token. A 128-token prompt: 6 us instead of 11 us (64 of them per batch)
        if set(map(type, ids)) == _PLAIN_INT:
            outside = min(ids) < 0 or max(ids) >= vocab
        else:
            outside = any((not isinstance(t, int)) or isinstance(t, bool) or t < 0 or t >= vocab for t in ids)
        if outside:
            raise HotswapError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_context_len:
            raise HotswapError(f"prompt {i} has {len(ids)} tokens; the context length is {self.max_context_len}")

    def _draw_seeds(self, count: int) -> list[int]:
        """Seeds for `count` requests without one, drawn from the engine's seed (one lock hold for a whole call)."""
        with self._rng_lock:
            return [self._rng.getrandbits(62) for _ in range(count)]
