"""Admission and batch formation: a token budget, chunked prefill, mixed prefill/decode, preemption.

Running sequences are served first, oldest first; when pages run out the prefix cache is evicted, then
the newest running sequence is preempted (its pages freed, recomputed later from its tokens).

Prompt pages enter the prefix cache as they are computed, and a fresh request waits for pages of its prompt
another running request is computing right now (scheduler/prompt_sharing.py).

Progress is guaranteed: waiting sequences hold no pages (a prefix match is taken only at the moment of
admission and given back if admission fails), so when nothing runs every used page is an evictable
cache page; a sequence that alone cannot fit the whole cache is failed with a message instead of
being preempted and re-admitted forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hotswap.cache.page_allocator import PageAllocator
from hotswap.cache.radix_cache import RadixPrefixCache
from hotswap.runner.batch_entry import BatchEntry
from hotswap.scheduler.kept_decode import KeptDecode
from hotswap.scheduler.overlap import DECODE, NOTHING, inputs_from_inflight, running_step, token_in_flight
from hotswap.scheduler.prompt_sharing import PromptSharing
from hotswap.scheduler.sequence import Sequence, Status


@dataclass(kw_only=True, slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    entries: list[BatchEntry]


@dataclass(kw_only=True, slots=True)
class Batcher:
    allocator: PageAllocator
    prefix_cache: RadixPrefixCache | None
    max_running_requests: int
    max_num_batched_tokens: int
    max_context_len: int
    chunked_prefill_size: int
    fail: Callable[[Sequence, str], None]  # ends a sequence that can never fit (already out of running/waiting)
    eos_token_ids: frozenset[int] = frozenset()  # masked with stop_token_ids until min_new_tokens are out
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0
    # (prefix-cache hit tokens, prompt tokens) of the requests the latest batch admitting any took in (/v1/loads' cache_hit_rate)
    last_admission: tuple[int, int] = (0, 0)
    cache_epoch: int = 0  # advanced when the weights change: KV computed before may not enter the prefix cache
    sharing: PromptSharing | None = field(init=False, default=None)  # with a prefix cache: running prompts' pages
    keep_decode: bool = True  # advance the last batch's leading decode entries in place (kept_decode.py); off: every row built again
    kept: KeptDecode | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.prefix_cache is not None:
            self.sharing = PromptSharing(allocator=self.allocator, prefix_cache=self.prefix_cache)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_started(self) -> bool:
        """Some sequence has computed tokens: running, or preempted/retracted and waiting to resume."""
        return self.num_started > 0

    @property
    def num_started(self) -> int:
        """Sequences with computed tokens that have not finished (running, or preempted/retracted and waiting)."""
        return len(self.running) + sum(1 for s in self.waiting if s.admitted)

    def _pages_needed(self, seq: Sequence, upto: int) -> int:
        return max(0, self.allocator.pages_for(upto) - len(seq.pages))

    def _ensure_free(self, n: int) -> bool:
        if self.allocator.num_free < n and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.allocator.num_free)
        return self.allocator.num_free >= n

    def schedule(self, admit_new: bool = True) -> ScheduledBatch | None:
        """The next step. admit_new=False (a weight update drains) still re-admits sequences that started."""
        sharing, epoch = self.sharing, self.cache_epoch
        if sharing is not None:
            sharing.begin_call(epoch)
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        entries: list[BatchEntry] = []
        i = 0
        kept = self.kept if self.keep_decode else None
        if kept is not None:
            entries = kept.advance(self.running, budget, self.allocator, self._plan_penalties)
            i = len(entries)
            if i:
                seqs = self.running[:i]
                budget -= i
        advanced = lead = i  # rows 0..lead-1 of the batch: decode rows of running[0..lead-1]
        page_size = self.allocator.page_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            step = running_step(seq, self.max_context_len)
            if step == NOTHING:
                i += 1  # nothing more to compute
                continue
            decoding = step == DECODE
            n = 1 if decoding else min(seq.num_tokens + seq.pending - seq.num_computed, self.chunked_prefill_size, budget)
            if n <= 0:  # a prompt-only request (max_new_tokens 0) whose last chunk is in flight
                i += 1
                continue
            if seq.num_computed + n > len(seq.pages) * page_size:
                need = self._pages_needed(seq, seq.num_computed + n)
                if not self._make_room(seq, need):
                    break
                seq.pages.extend(self.allocator.allocate(need))
            if decoding and lead == i == len(entries):
                lead += 1
            entries.append(self._decode_entry(seq) if decoding else self._entry(seq, n))
            seqs.append(seq)
            budget -= n
            i += 1
        if self.keep_decode and not (kept is not None and lead == advanced == len(kept.seqs)):
            self.kept = KeptDecode.of(seqs[:lead], entries[:lead], self.max_context_len) if lead else None
        followers: list[Sequence] = []  # fresh sequences waiting for a prompt another one computes now
        hits = prompts = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            seq = self.waiting[0]
            if token_in_flight(seq):  # preempted with a token in flight: admit it once that token is read back
                break
            if not (admit_new or seq.admitted):
                break
            if sharing is not None and sharing.still_waits(seq, epoch):
                followers.append(self.waiting.popleft())
                continue
            limit = self._match_limit(seq)
            self._match_prefix(seq, limit)
            if sharing is not None and sharing.follows(seq, limit, epoch):
                self._drop_pages(seq)
                followers.append(self.waiting.popleft())
                continue
            n = min(seq.num_tokens - seq.num_computed, self.chunked_prefill_size, budget)
            need = self._pages_needed(seq, seq.num_computed + n)
            if not self._ensure_free(need):
                self._drop_pages(seq)
                if self.running:
                    break  # room comes back as running sequences finish
                self.waiting.popleft()  # nothing else holds a page: it can never fit
                self.fail(seq, self._too_big(self.allocator.pages_for(seq.num_tokens + 1)))
                continue
            self.waiting.popleft()
            seq.pages.extend(self.allocator.allocate(need))
            seq.cache_epoch = epoch  # a waiting sequence holds no pages: all of its KV is computed from here
            seq.status = Status.RUNNING
            if not seq.admitted:
                seq.cached_tokens = seq.num_computed
                seq.admitted = True
                hits, prompts = hits + seq.cached_tokens, prompts + seq.prompt_len
                if sharing is not None:
                    sharing.start(seq, epoch)
            self.running.append(seq)
            entries.append(self._entry(seq, n))
            seqs.append(seq)
            budget -= n
        self.waiting.extendleft(reversed(followers))  # first in line again, in their order
        if prompts:
            self.last_admission = (hits, prompts)
        return ScheduledBatch(seqs=seqs, entries=entries) if entries else None

    def _make_room(self, seq: Sequence, need: int) -> bool:
        """Free `need` pages for running `seq`, preempting the newest sequences; False when `seq` itself
        had to go (preempted, or failed when it alone does not fit the cache)."""
        while not self._ensure_free(need):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self.running.remove(seq)
                self.fail(seq, self._too_big(len(seq.pages) + need))
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _too_big(self, pages: int) -> str:
        a = self.allocator
        return (f"the request does not fit the KV cache: it needs {pages} pages of {a.page_size} tokens, "
                f"the cache has {a.num_pages}")

    def _entry(self, seq: Sequence, n: int) -> BatchEntry:
        """Plan computing tokens [num_computed, num_computed + n) and advance the sequence's bookkeeping
        now, so the next step can be scheduled while this one runs."""
        start = seq.num_computed
        end = start + n
        known = seq.num_tokens
        row = seq.row()
        # tokens not read back yet (in flight) are placeholders, filled on the device
        if end <= known:  # a prompt chunk, or a recomputation of known tokens
            input_ids = seq.tokens_slice(start, end)
        else:
            input_ids = [0] * n if start >= known else seq.tokens_slice(start, known) + [0] * (end - known)
        entry = BatchEntry(
            input_ids=input_ids,
            start_pos=start,
            pages=seq.pages,
            sample=end == known + seq.pending and seq.req.sampling_params.max_new_tokens > 0,
            params=seq.req.sampling_params,
            row=row,
            step=len(seq.output_ids) + seq.pending,
            prev_row=inputs_from_inflight(seq, end),
        )
        if entry.sample and row.penalized:
            self._plan_penalties(seq, entry)
        # a chunk of the prompt (never a decode step) of a request that returns logprobs: maybe prompt logprobs
        if row.return_logprob and start < seq.prompt_len - 1:
            self._plan_prompt_logprobs(seq, entry, end)
        seq.num_computed = end
        if entry.sample:
            seq.pending += 1
        return entry

    def _decode_entry(self, seq: Sequence) -> BatchEntry:
        """`_entry` of a decoding sequence (`running_step` DECODE), built directly: at hundreds of rows
        this runs for every row of every step, and its one input is known without slicing any tokens."""
        start = seq.num_computed
        # positionally (keywords cost about as much again): input_ids (the token in flight, filled on the device),
        # start_pos, pages, sample, params, row, step, prev_row
        entry = BatchEntry([0], start, seq.pages, True, seq.req.sampling_params, seq.row(), len(seq.output_ids) + 1,
                           seq.pending_row)
        if entry.row.penalized:
            self._plan_penalties(seq, entry)
        seq.num_computed = start + 1
        seq.pending += 1
        return entry

    def _plan_penalties(self, seq: Sequence, entry: BatchEntry) -> None:
        """The penalty state the runner reads, kept on the sequence so that a step adds only what changed."""
        sp = seq.req.sampling_params
        if sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
            entry.output_ids = seq.counted_output()
        if sp.repetition_penalty != 1.0 and sp.vllm_penalty_rule:  # SGLang's repetition counts output tokens only
            entry.prompt_ids = seq.distinct_prompt_ids()
        if entry.step < sp.min_new_tokens:
            if seq.banned_ids is None:
                # eos too under ignore_eos: SGLang's BatchedMinNewTokensPenalizer and vLLM's min_tokens mask it regardless
                seq.banned_ids = sorted(set(sp.stop_token_ids) | self.eos_token_ids)
            entry.banned_ids = seq.banned_ids

    def _plan_prompt_logprobs(self, seq: Sequence, entry: BatchEntry, end: int) -> None:
        """The prompt positions of this chunk whose logits give prompt logprobs (positions already scored,
        e.g. before a preemption, are skipped)."""
        first = max(entry.start_pos, seq.prompt_logprobs_owed)
        last = min(end, seq.prompt_len - 1)
        if first < last:
            entry.prompt_from = first - entry.start_pos
            entry.prompt_targets = seq.req.input_ids[first + 1 : last + 1]

    @staticmethod
    def _match_limit(seq: Sequence) -> int:
        """How many leading tokens a prefix match may give: all but the last, and none whose prompt logprob is
        still owed (only a request returning logprobs owes any; those positions are recomputed: their logits
        are needed)."""
        limit = seq.num_tokens - 1
        if seq.req.sampling_params.return_logprob and seq.prompt_logprobs_owed < seq.prompt_len - 1:
            limit = min(limit, seq.prompt_logprobs_owed)
        return limit

    def _match_prefix(self, seq: Sequence, limit: int) -> None:
        """Take cached pages for the first `limit` tokens (`_match_limit`), leaving at least one token to compute."""
        if self.prefix_cache is None:
            return
        pages = self.prefix_cache.match(seq.tokens_slice(0, limit))
        self.allocator.retain(pages)
        seq.pages = pages
        seq.num_computed = len(pages) * self.allocator.page_size

    def _drop_pages(self, seq: Sequence) -> None:
        """Give back pages holding nothing new (a prefix match whose admission failed)."""
        self.allocator.release(seq.pages)
        seq.pages = []
        seq.num_computed = 0

    def cache_and_release(self, seq: Sequence) -> None:
        """Hand a sequence's computed full pages to the prefix cache (unless the weights changed since they
        were computed) and drop its own references."""
        if self.prefix_cache is not None and seq.num_computed and seq.cache_epoch == self.cache_epoch:
            self.prefix_cache.insert(seq.tokens_slice(0, seq.num_computed), seq.pages)
        self._drop_pages(seq)

    def invalidate_cache(self) -> None:
        """The weights changed: drop every cached prefix, and keep the KV of sequences still holding pages (a
        pause in place froze them) out of the cache when they finish. Their own pages stay theirs, except those of
        a sequence frozen while its KV was still being computed (a prompt in chunks, or a recomputation after a
        preemption or a retract): it is retracted and recomputes with the new weights. Else the tokens it samples
        next, labelled with the new version, would read KV the old weights computed for positions no token label
        attributes to them (all of a prompt, when it had sampled nothing yet)."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset()
        self.cache_epoch += 1
        for seq in reversed([s for s in self.running if _mid_prefill(s)]):  # back first in line, in their order
            self.preempt(seq, out_of_pages=False)

    def preempt(self, seq: Sequence, *, out_of_pages: bool = True) -> None:
        """Free a running sequence's pages and put it first in line; it is recomputed from its tokens."""
        self.running.remove(seq)
        self.cache_and_release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += out_of_pages

    def retract_all(self) -> None:
        """pause_generation("retract"): every running sequence goes back to waiting (not counted as preemption)."""
        for seq in reversed(list(self.running)):
            self.preempt(seq, out_of_pages=False)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache_and_release(seq)
        seq.status = Status.FINISHED

    def find(self, rid: str) -> list[Sequence]:
        """The running or waiting request `rid`, or every sample of the prompt whose rid it is (n > 1)."""
        return [s for s in (*self.running, *self.waiting) if s.rid == rid or s.req.group == rid]

    def all_seqs(self) -> list[Sequence]:
        return [*self.running, *self.waiting]


def _mid_prefill(seq: Sequence) -> bool:
    """Its KV is still being computed: it sampled nothing yet, or it recomputes tokens it had (a decoding sequence
    lacks only its last sampled token's KV). Never with a token in flight (weights change between steps)."""
    return not seq.pending and (not seq.output_ids or seq.num_computed < seq.num_tokens - 1)
