"""Turns sampled tokens into request outputs: stop checks, incremental detokenization, delivery."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hotswap.protocol import GenerateOutput
from hotswap.scheduler.detokenizer import IncrementalDetokenizer, fast_backend, output_context, output_contexts, text_ids
from hotswap.scheduler.sequence import Sequence

log = logging.getLogger(__name__)


def _touches(stop: str, special: str) -> bool:
    """Whether `stop` can match across `special`'s text: it holds it, lies inside it, or runs into or out of it."""
    return special in stop or stop in special or any(
        stop.endswith(special[:i]) or stop.startswith(special[-i:]) for i in range(1, min(len(stop), len(special))))


def input_logprobs(seq: Sequence) -> tuple[list, list | None]:
    """SGLang's shapes: the prompt tokens from logprob_start_len, each with the logprob it had given the
    tokens before it; the first has None (SGLang computes no logits before its start). The top-k list
    likewise starts with None; it is only built when top_logprobs_num asks for it."""
    s = seq.prompt_logprob_start
    ids = seq.req.input_ids[s:]
    values = [None, *seq.input_logprobs]
    tops = [None, *seq.input_top_logprobs][: len(ids)] if seq.req.sampling_params.top_logprobs_num else None
    return list(zip(values, ids)), tops


@dataclass(kw_only=True, slots=True)
class OutputStreamer:
    # a transformers tokenizer; only `decode` (and a fast tokenizer's backend) is used. None (skip_tokenizer_init):
    # outputs carry no text (stop strings, which need it, are refused before a request gets here)
    tokenizer: object | None
    eos_token_ids: frozenset[int]
    max_context_len: int
    stream_interval: int = 1  # a streaming request gets an output every this many tokens (SGLang's stream_interval)
    # the Rust tokenizer of a fast HF tokenizer, used directly where `tokenizer.decode` would add only its
    # per-token input checks (no clean-up pass configured); None: every decode goes through `tokenizer.decode`
    backend: object | None = field(init=False)
    # each consumer's per-step flush, called once after the step's outputs are sunk (one hand-off per step)
    pending_flushes: dict = field(init=False, default_factory=dict)  # callable -> None (an ordered set)

    # the text of every special token (what skip_special_tokens leaves out of the text)
    special_texts: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.backend = fast_backend(self.tokenizer)
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        specials = {t.content for t in added.values() if getattr(t, "special", False)}
        specials.update(getattr(self.tokenizer, "all_special_tokens", None) or ())
        self.special_texts = tuple(sorted(t for t in specials if t))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_many(self, id_lists: list[list[int]], skip_special_tokens: list[bool], contexts: list[list[int]]) -> list[str]:
        """Several sequences at once (a step that finishes many requests), each the text its ids add after its
        context (`output_context`): one backend call per skip_special_tokens setting instead of a Python-wrapped
        decode per sequence."""
        texts: list[str] = [""] * len(id_lists)
        for skip in set(skip_special_tokens):
            rows = [i for i, s in enumerate(skip_special_tokens) if s == skip]
            wholes = self._decode_batch([contexts[i] + id_lists[i] for i in rows], skip)
            heads = self._decode_batch([contexts[i] for i in rows], skip)
            for i, whole, head in zip(rows, wholes, heads):
                texts[i] = whole[len(head) :]
        return texts

    def _decode_batch(self, id_lists: list[list[int]], skip: bool) -> list[str]:
        if self.backend is None:
            return [self.tokenizer.decode(ids, skip_special_tokens=skip) for ids in id_lists]
        return self.backend.decode_batch(id_lists, skip_special_tokens=skip)

    def append_token(self, seq: Sequence, token: int, logprob: float, top: list[tuple[float, int]], version: str) -> None:
        """Record one sampled token and decide whether the sequence is done."""
        req = seq.req  # every step calls this for every row: each attribute read once
        sp = req.sampling_params
        output_ids = seq.output_ids
        output_ids.append(token)
        if sp.return_logprob:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top)
        seq.token_versions.append(version)
        n = len(output_ids)
        # SGLang's order: the length limit first (a last allowed token that is eos still reports length)
        if n >= sp.max_new_tokens:
            seq.finish_reason = {"type": "length", "length": sp.max_new_tokens}
        elif (not sp.ignore_eos and token in self.eos_token_ids
              or (not sp.ignore_eos or sp.keep_stop_token_ids) and token in sp.stop_token_ids):
            # SGLang's rule: ignore_eos turns off every token-based stop, stop_token_ids included (vLLM's keeps them)
            seq.finish_reason = {"type": "stop", "matched": token}
        elif len(req.input_ids) + n >= self.max_context_len:  # seq.num_tokens, without the property call
            seq.finish_reason = {"type": "length", "length": n}
        if req.stream_text:
            seen = len(seq.text)
            self._detokenize(seq)
            # SGLang (Req.check_finished) matches stop strings from the first token: min_new_tokens masks only eos and
            # stop_token_ids, on the device. vLLM's rule (its route): stop strings wait until more than min_tokens are
            # out, and text from before then never matches (Detokenizer.update's stop_check_offset)
            if sp.stop and seq.finish_reason is None and (not sp.vllm_penalty_rule or len(seq.output_ids) > sp.min_new_tokens):
                self._check_stop_strings(seq, seen)

    def detokenizer(self, skip_special_tokens: bool, prompt_ids: list[int]) -> IncrementalDetokenizer:
        """An incremental detokenizer that gives what `decode` gives for an output after `prompt_ids` (DecodeStream over
        the backend when there is one)."""
        return IncrementalDetokenizer(backend=self.backend, decode=self.decode, skip_special_tokens=skip_special_tokens,
                                      context=output_context(prompt_ids, self.decode))

    def _detokenize(self, seq: Sequence) -> None:
        """Append newly complete text; a trailing partial UTF-8 character waits for the next token."""
        if seq.detokenizer is None:
            seq.detokenizer = self.detokenizer(self._skip(seq), seq.req.input_ids)
        seq.text += seq.detokenizer.step(self._text_ids(seq))

    def _check_stop_strings(self, seq: Sequence, seen: int) -> None:
        """Match stop strings that end in the text after `seen` characters: text from before was checked
        already, or was held by vLLM's min_tokens (a stop string wholly inside it does not stop the request)."""
        sp = seq.req.sampling_params
        if len(seq.text) > seen:
            # the first stop string in the request's order that the new text holds ends it, as SGLang
            # (Req._check_str_based_finish) and vLLM (check_stop_strings) take it, not the earliest-placed one
            for s in sp.stop:
                if (pos := seq.text.find(s, max(0, seen - len(s) + 1))) != -1:
                    if not sp.no_stop_trim:  # which keeps all the text (the final decode)
                        seq.text = seq.text[: pos + len(s) if sp.include_stop_str_in_output else pos]
                    seq.finish_reason = {"type": "stop", "matched": s}
                    return
        if sp.skip_special_tokens:  # a skipped special token adds no text: checked whether the text grew or not
            self._check_special_stops(seq)

    def _check_special_stops(self, seq: Sequence) -> None:
        """A stop string holding a special token's text ("<|im_end|>", "<|eot_id|>"), or a piece of it ("<|im_end",
        "word<|"), never appears in a text that skips special tokens. SGLang (managers/schedule_batch.py,
        Req._check_str_based_finish) matches stop strings in the raw decode of the last max-stop-length + 1 tokens too,
        so they stop there; the text stays as decoded."""
        sp = seq.req.sampling_params
        if seq.special_stops is None:
            seq.special_stops = [s for s in sp.stop if any(_touches(s, t) for t in self.special_texts)]
        if not seq.special_stops:
            return
        tail = self.decode(seq.output_ids[-(max(len(s) for s in seq.special_stops) + 1):], False)
        for s in seq.special_stops:
            if s in tail:
                seq.finish_reason = {"type": "stop", "matched": s}
                return

    def _skip(self, seq: Sequence) -> bool:
        return seq.req.sampling_params.skip_special_tokens

    @staticmethod
    def _text_is_final(seq: Sequence) -> bool:
        """A stop string matched: the streamed text, cut at it, is the answer (not a fresh decode; no_stop_trim's is)."""
        reason = seq.finish_reason
        return (seq.req.stream_text and bool(reason) and reason.get("type") == "stop" and isinstance(reason.get("matched"), str)
                and not seq.req.sampling_params.no_stop_trim)

    @staticmethod
    def _text_ids(seq: Sequence) -> list[int]:
        return text_ids(seq.output_ids, seq.finish_reason, seq.req.sampling_params.keeps_stop_text)

    def emit_finished(self, seqs: list[Sequence], weight_version: str) -> None:
        """Send the last output of finished sequences; their full texts are decoded in one call."""
        todo = [s for s in seqs if not self._text_is_final(s)] if self.tokenizer is not None else []
        contexts = output_contexts([s.req.input_ids for s in todo], self._decode_batch)
        texts = dict(zip(map(id, todo), self.decode_many([self._text_ids(s) for s in todo], [self._skip(s) for s in todo], contexts)))
        for seq in seqs:
            text = texts.get(id(seq), seq.text)
            if seq.detokenizer is not None and not text.startswith(seq.text):  # see IncrementalDetokenizer.rest
                text = seq.text + seq.detokenizer.rest(self._text_ids(seq))
            self._send(seq, weight_version, True, text)

    def emit(self, seq: Sequence, weight_version: str) -> None:
        """Stream what the client of a running sequence has not seen yet (everything new since the last emit): one
        plain new token as a token row when the request's consumer takes them, else a GenerateOutput."""
        req = seq.req
        sp = req.sampling_params
        new = len(seq.output_ids) - seq.sent_tokens
        interval = sp.stream_interval or self.stream_interval  # the request's own interval, else the server's (SGLang's rule)
        # SGLang's stream_output_generation sends at output lengths 1, 1 + N, 1 + 2N... (len % N == 1 for N > 1): the
        # first token goes out at once, whatever the interval
        if new < interval and seq.sent_tokens:
            return
        if (new == 1 and req.sink_token is not None and not req.stream_text and not sp.top_logprobs_num and not sp.return_top_p_token_ids
                and (seq.sent_input_logprobs or not sp.return_logprob)):
            seq.sent_tokens += 1
            try:
                req.sink_token((req.rid, seq.output_ids[-1], seq.logprobs[-1] if sp.return_logprob else None, seq.token_versions[-1],
                                len(req.input_ids), seq.cached_tokens))
            except Exception:  # noqa: BLE001 - as _send: a broken consumer must not end the loop
                log.exception("delivering an output of %s failed", req.rid)
            if req.flush is not None:
                self.pending_flushes[req.flush] = None
            return
        self._send(seq, weight_version, False, seq.text)

    def flush(self) -> None:
        """Hand this step's outputs over: one call per consumer (e.g. one event-loop wake-up), not per token.
        A failing consumer costs only itself (its sink is expected to abort its own requests)."""
        flushes, self.pending_flushes = self.pending_flushes, {}
        for fn in flushes:
            try:
                fn()
            except Exception:  # noqa: BLE001 - never let one consumer end the scheduler loop
                log.exception("a consumer's flush failed")

    def _send(self, seq: Sequence, weight_version: str, finished: bool, text: str) -> None:
        """`text`: the sequence's whole text so far (final when finished). The output's weight_version is that
        of its last token (a request frozen by a pause in place and aborted after an update was computed by the
        old weights); the engine's current one when it has no token."""
        start = seq.sent_tokens
        if finished:
            delta = text[seq.sent_text :] if text.startswith(seq.text[: seq.sent_text]) else text
        else:
            delta = text[seq.sent_text :]
            if seq.req.sampling_params.stop:  # hold back text that could still become a stop string
                hold = max(len(s) for s in seq.req.sampling_params.stop) - 1
                delta = delta[: max(0, len(delta) - hold)]
        out = GenerateOutput(
            rid=seq.rid,
            new_token_ids=seq.output_ids[start:],
            new_logprobs=seq.logprobs[start:],
            new_top_logprobs=seq.top_logprobs[start:],
            new_token_versions=seq.token_versions[start:],
            text_delta=delta,
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.prompt_len,
            cached_tokens=seq.cached_tokens,
            weight_version=seq.token_versions[-1] if seq.token_versions else weight_version,
            routed_experts=seq.routed_experts if finished else None,
            new_top_p_token_ids=seq.top_p_token_ids[start:],
        )
        if seq.req.sampling_params.return_logprob and not seq.sent_input_logprobs:
            out.input_token_logprobs, out.input_top_logprobs = input_logprobs(seq)
            seq.sent_input_logprobs = True
        seq.sent_tokens = len(seq.output_ids)
        seq.sent_text += len(delta)
        try:
            seq.req.sink(out)
        except Exception:  # noqa: BLE001 - a broken consumer must not end the loop for everyone else
            log.exception("delivering an output of %s failed", seq.rid)
        if seq.req.flush is not None:
            self.pending_flushes[seq.req.flush] = None
