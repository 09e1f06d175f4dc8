"""Turns sampled tokens into request outputs: stop checks, incremental detokenization, delivery."""

from __future__ import annotations

from dataclasses import dataclass

from hotswap.protocol import GenerateOutput
from hotswap.scheduler.sequence import Sequence


@dataclass(kw_only=True, slots=True)
class OutputStreamer:
    tokenizer: object  # a transformers tokenizer; only `decode` is used
    eos_token_ids: frozenset[int]
    max_context_len: int

    def append_token(self, seq: Sequence, token: int, logprob: float, top: list[tuple[float, int]], version: str) -> None:
        """Record one sampled token and decide whether the sequence is done."""
        seq.output_ids.append(token)
        if seq.req.sampling_params.return_logprob:
            seq.logprobs.append(logprob)
            seq.top_logprobs.append(top)
        seq.token_versions.append(version)
        sp = seq.req.sampling_params
        if not sp.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = {"type": "stop", "matched": token}
        elif token in sp.stop_token_ids:
            seq.finish_reason = {"type": "stop", "matched": token}
        elif len(seq.output_ids) >= sp.max_new_tokens:
            seq.finish_reason = {"type": "length", "length": sp.max_new_tokens}
        elif seq.num_tokens >= self.max_context_len:
            seq.finish_reason = {"type": "length", "length": len(seq.output_ids)}
        if seq.req.stream_text:
            self._detokenize(seq)
            if sp.stop and seq.finish_reason is None:
                self._check_stop_strings(seq)

    def _detokenize(self, seq: Sequence) -> None:
        """Append newly complete text; a trailing partial UTF-8 character waits for the next token."""
        ids = seq.output_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=self._skip(seq))
        full = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=self._skip(seq))
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _check_stop_strings(self, seq: Sequence) -> None:
        sp = seq.req.sampling_params
        window = max(len(s) for s in sp.stop) + 16
        start = max(0, len(seq.text) - window)
        for s in sp.stop:
            pos = seq.text.find(s, start)
            if pos != -1:
                seq.text = seq.text[:pos]
                seq.finish_reason = {"type": "stop", "matched": s}
                return

    def _skip(self, seq: Sequence) -> bool:
        return seq.req.sampling_params.skip_special_tokens

    def final_text(self, seq: Sequence) -> str:
        if seq.req.stream_text:
            if seq.finish_reason and seq.finish_reason.get("type") == "stop" and isinstance(seq.finish_reason.get("matched"), str):
                return seq.text
            return self.tokenizer.decode(seq.output_ids, skip_special_tokens=self._skip(seq))
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=self._skip(seq))

    def emit(self, seq: Sequence, weight_version: str, *, finished: bool) -> None:
        """Send what the client has not seen yet (everything new since the last emit)."""
        start = seq.sent_tokens
        if finished:
            text = self.final_text(seq)
            delta = text[seq.sent_text :] if text.startswith(seq.text[: seq.sent_text]) else text
        else:
            delta = seq.text[seq.sent_text :]
            if seq.req.sampling_params.stop:  # hold back text that could still become a stop string
                hold = max(len(s) for s in seq.req.sampling_params.stop) - 1
                delta = delta[: max(0, len(delta) - hold)]
        if not finished and start == len(seq.output_ids):
            return
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
            weight_version=weight_version,
        )
        seq.sent_tokens = len(seq.output_ids)
        seq.sent_text += len(delta)
        seq.req.sink(out)
