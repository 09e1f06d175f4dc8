"""Incremental detokenization: the new text as tokens arrive, a trailing partial UTF-8 character held back
until it completes. Used on the scheduler thread (requests with stop strings) and by streaming consumers.

The output is decoded after the prompt's last tokens (SGLang's `Req.init_incremental_detokenize` keeps 5 of them,
vLLM's detokenizer primes its stream with them): a SentencePiece decoder strips the "▁" space of the first token
it decodes, so an output decoded alone would lose the space its first word starts with."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers.decoders import DecodeStream

CONTEXT_TOKENS = 5  # SGLang's INIT_INCREMENTAL_DETOKENIZATION_OFFSET
# tokenizers raises DecodeStreamError::InvalidPrefix untyped: a byte-fallback decoder turns bytes it had shown as
# characters into U+FFFD once later bytes make their run invalid UTF-8, so the decode no longer extends the text shown
INVALID_PREFIX = "Invalid prefix encountered"


def output_context(prompt_ids: Sequence[int], decode: Callable[[list[int], bool], str]) -> list[int]:
    """The prompt tokens an output is decoded after: its last CONTEXT_TOKENS, or none when they end mid-character
    (the output's first bytes would complete it, and the context's text would not be a prefix of the whole)."""
    context = list(prompt_ids[-CONTEXT_TOKENS:])
    return usable_context(context, decode(context, False))


def output_contexts(prompts: list[Sequence[int]], decode_batch: Callable[[list[list[int]], bool], list[str]]) -> list[list[int]]:
    """`output_context` of many prompts in one batched decode (a step that finishes many requests)."""
    tails = [list(p[-CONTEXT_TOKENS:]) for p in prompts]
    return [usable_context(t, text) for t, text in zip(tails, decode_batch(tails, False))]


def usable_context(context: list[int], text: str) -> list[int]:
    """`context`, unless its text `text` ends mid-character."""
    return context if context and "\ufffd" not in text else []


def text_ids(output_ids: list[int], finish_reason: dict | None, keep_stop_token: bool) -> list[int]:
    """The output ids a text is decoded from: all of them but a matched stop token, whose text is left out unless
    `keep_stop_token` (SGLang's detokenizer_manager.trim_matched_stop unless no_stop_trim; vLLM leaves it out unless
    include_stop_str_in_output). `output_ids` keep it."""
    matched = finish_reason.get("matched") if finish_reason else None
    if type(matched) is int and not keep_stop_token and output_ids:
        return output_ids[:-1]
    return output_ids


class IncrementalDetokenizer:
    """`backend`: a fast tokenizer's Rust tokenizer, stepped a token at a time by tokenizers' DecodeStream
    (about 1 us a token against 6 for two decodes). None (a slow tokenizer, or one whose `decode` cleans up
    spaces after the Rust decoder): `decode(ids, skip_special_tokens)` twice a step over a sliding window, which
    also takes over from a DecodeStream that refuses a token (an invalid prefix), as vLLM's `_protected_step`
    recovers from it. Both give the text `ids` add after `context` when decoded together, as it becomes final."""

    __slots__ = ("_backend", "_stream", "_decode", "_skip", "_context", "_seen", "_shown", "_prefix_offset", "_read_offset")

    def __init__(self, *, backend: object | None, decode: Callable[[list[int], bool], str], skip_special_tokens: bool,
                 context: Sequence[int] = ()):
        self._backend = backend
        self._decode, self._skip = decode, skip_special_tokens
        self._context = list(context)
        self._seen = 0  # tokens of `ids` already stepped
        self._shown = 0  # tokens of context + ids whose text has been returned (the stream's)
        self._stream = None
        self._prefix_offset, self._read_offset = 0, len(self._context)  # the window's, over context + ids
        if backend is not None:
            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            try:
                for t in self._context:
                    stream.step(backend, t)
                self._stream, self._shown = stream, len(self._context)
            except Exception as exc:  # noqa: BLE001 - as in step: the window decodes instead
                if not str(exc).startswith(INVALID_PREFIX):
                    raise

    def step(self, ids: list[int]) -> str:
        """`ids`: the whole output so far (it only grows); returns the text its new tokens complete."""
        text = ""
        if self._stream is not None:
            for k in range(self._seen, len(ids)):
                try:
                    piece = self._stream.step(self._backend, ids[k])
                except Exception as exc:  # noqa: BLE001 - tokenizers raises it untyped
                    if not str(exc).startswith(INVALID_PREFIX):
                        raise
                    self._stream = None  # the window decodes on from the last text shown, nothing lost or repeated
                    self._prefix_offset, self._read_offset = max(0, self._shown - CONTEXT_TOKENS), self._shown
                    break
                if piece:
                    text += piece
                    self._shown = len(self._context) + k + 1
            else:
                self._seen = len(ids)
                return text
        full_ids = self._context + ids
        prefix = self._decode(full_ids[self._prefix_offset : self._read_offset], self._skip)
        full = self._decode(full_ids[self._prefix_offset :], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(full_ids)
            return text + full[len(prefix) :]
        return text

    def rest(self, ids: list[int]) -> str:
        """The text of the tokens of `ids` that `step` has not shown yet, a trailing partial character as U+FFFD:
        what a finished output adds to the text streamed (SGLang's last chunk). A byte-fallback decode of the whole
        output may differ from the text streamed, which a client has already taken."""
        full_ids = self._context + ids
        start = self._shown if self._stream is not None else self._read_offset
        head = max(0, start - CONTEXT_TOKENS) if self._stream is not None else self._prefix_offset
        return self._decode(full_ids[head:], self._skip)[len(self._decode(full_ids[head:start], self._skip)) :]


def fast_backend(tokenizer) -> object | None:
    """The Rust tokenizer of a fast HF tokenizer, used directly where `tokenizer.decode` would add only its
    per-token input checks; None (a slow tokenizer, or a clean-up pass configured): go through `tokenizer.decode`."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return getattr(tokenizer, "backend_tokenizer", None)


def detokenizer_for(tokenizer, skip_special_tokens: bool, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
    """An incremental detokenizer of `tokenizer` that gives what its `decode` gives for an output after `prompt_ids`."""
    decode = lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)  # noqa: E731
    return IncrementalDetokenizer(backend=fast_backend(tokenizer), skip_special_tokens=skip_special_tokens, decode=decode,
                                  context=output_context(prompt_ids, decode))
