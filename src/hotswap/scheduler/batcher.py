"""Admission and batch formation: a token budget, chunked prefill, mixed prefill/decode, preemption.

Running sequences are served first, oldest first; when pages run out the prefix cache is evicted, then
the newest running sequence is preempted (its pages freed, recomputed later from its tokens).

Prompt pages enter the prefix cache as they are computed, not only when their sequence ends (SGLang caches an
unfinished request's prompt the same way): a request that arrives while another one with the same prefix runs
(a sample of the same prompt sent a moment later, prompts sharing a system prompt or few-shot examples) matches
it. A fresh sequence whose next uncached prompt pages another running sequence is computing right now (GRPO's
n samples of one prompt admitted together, a batch of prompts with a common head) waits until they are in and
matches them instead of computing them again; it waits only for at least `FOLLOW_MIN_TOKENS` shared tokens, or
for all it could match.

Progress is guaranteed: waiting sequences hold no pages (a prefix match is taken only at the moment of
admission and given back if admission fails), so when nothing runs every used page is an evictable
cache page; a sequence that alone cannot fit the whole cache is failed with a message instead of
being preempted and re-admitted forever.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hotswap.cache.page_allocator import PageAllocator
from hotswap.cache.radix_cache import RadixPrefixCache
from hotswap.runner.batch_entry import BatchEntry
from hotswap.scheduler.overlap import decodes_token_in_flight, in_flight_token_is_last, inputs_from_inflight, token_in_flight
from hotswap.scheduler.sequence import Sequence, Status


@dataclass(kw_only=True, slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    entries: list[BatchEntry]


FOLLOW_MIN_TOKENS = 32  # a shorter shared run (and not all a prompt could match) is computed again: no wait


@dataclass(eq=False, slots=True)
class _PromptInFlight:
    """A fresh sequence while it computes full pages of its prompt that the prefix cache lacks."""

    seq: Sequence
    keys: list[int]  # its prompt's page keys (Sequence.prompt_page_keys)
    # prompt pages [0, published) are in the prefix cache: matched at admission, or published (a preemption may let
    # the cache evict some; re-admitted in the same call, it computes and publishes them again)
    published: int


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
    cache_epoch: int = 0  # advanced when the weights change: KV computed before may not enter the prefix cache
    _computing: list[_PromptInFlight] = field(default_factory=list)  # prompts whose pages are still being published
    _page_owner: dict[int, _PromptInFlight] = field(default_factory=dict)  # page key -> who computes that page now
    _waits: dict[Sequence, int] = field(default_factory=dict)  # sequences that waited in the last call -> the last page they wait for

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
        if self._computing:
            self._publish_prompts()
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        entries: list[BatchEntry] = []
        i = 0
        page_size = self.allocator.page_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if in_flight_token_is_last(seq, self.max_context_len):
                i += 1  # nothing more to compute
                continue
            decoding = decodes_token_in_flight(seq)
            n = 1 if decoding else min(seq.num_tokens + seq.pending - seq.num_computed, self.chunked_prefill_size, budget)
            if n <= 0:  # a prompt-only request (max_new_tokens 0) whose last chunk is in flight
                i += 1
                continue
            if seq.num_computed + n > len(seq.pages) * page_size:
                need = self._pages_needed(seq, seq.num_computed + n)
                if not self._make_room(seq, need):
                    break
                seq.pages.extend(self.allocator.allocate(need))
            entries.append(self._decode_entry(seq) if decoding else self._entry(seq, n))
            seqs.append(seq)
            budget -= n
            i += 1
        followers: list[Sequence] = []  # fresh sequences waiting for a prompt another one computes now
        waited, self._waits = self._waits, {}
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            seq = self.waiting[0]
            if token_in_flight(seq):  # preempted with a token in flight: admit it once that token is read back
                break
            if not (admit_new or seq.admitted):
                break
            if self._still_waits(seq, waited.get(seq)):
                followers.append(self.waiting.popleft())
                continue
            self._match_prefix(seq)
            if self._follows_a_prompt_in_flight(seq):
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
            seq.cache_epoch = self.cache_epoch  # a waiting sequence holds no pages: all of its KV is computed from here
            seq.status = Status.RUNNING
            if not seq.admitted:
                seq.cached_tokens = seq.num_computed
                seq.admitted = True
                self._start_prompt(seq)
            self.running.append(seq)
            entries.append(self._entry(seq, n))
            seqs.append(seq)
            budget -= n
        self.waiting.extendleft(reversed(followers))  # first in line again, in their order
        return ScheduledBatch(seqs=seqs, entries=entries) if entries else None

    def _follows_a_prompt_in_flight(self, seq: Sequence) -> bool:
        """A fresh sequence, its prefix matched, whose next prompt pages another running sequence is computing
        now (planned in this call or an earlier one): it waits, and matches them once they are published. Only
        for a shared run of at least FOLLOW_MIN_TOKENS, or of every page a match could give it; it then waits
        for that whole run (`_still_waits`)."""
        if self.prefix_cache is None or seq.admitted:
            return False
        ps = self.allocator.page_size
        matchable, have = self._match_limit(seq) // ps, len(seq.pages)
        if matchable <= have:
            return False
        keys = seq.prompt_page_keys(ps)
        last = min(matchable, have + -(-FOLLOW_MIN_TOKENS // ps)) - 1  # keys chain: this page shared => all before
        owner = self._owner_computing(keys[last])
        if owner is None:
            return False
        # the end of the run it shares with `owner`: the keys chain, so they are equal up to a page, different after
        shared = bisect.bisect_left(range(last + 1, min(matchable, len(owner.keys))), True, key=lambda j: keys[j] != owner.keys[j])
        self._waits[seq] = last + shared
        return True

    def _still_waits(self, seq: Sequence, last: int | None) -> bool:
        """A sequence that waited in the call before for prompt pages up to its page `last` waits on, without
        being matched again, while that page is still being computed: it is matched when it starts waiting and
        once the run it waits for is in, not at every step (a long head computed in many chunks, many waiting)."""
        if last is None or self._owner_computing(seq.prompt_page_keys(self.allocator.page_size)[last]) is None:
            return False
        self._waits[seq] = last
        return True

    def _owner_computing(self, key: int) -> _PromptInFlight | None:
        """The sequence computing the prompt page `key` names now, for sequences that may wait for it."""
        owner = self._page_owner.get(key)
        return owner if owner is not None and self._publishes(owner) else None

    def _publishes(self, entry: _PromptInFlight) -> bool:
        """Its sequence still runs on the weights its prompt's KV is computed with: its pages will be published."""
        return entry.seq.status is Status.RUNNING and entry.seq.cache_epoch == self.cache_epoch

    def _start_prompt(self, seq: Sequence) -> None:
        """A freshly admitted sequence computes the prompt pages past its match: others may wait for them."""
        if self.prefix_cache is None:
            return
        keys = seq.prompt_page_keys(self.allocator.page_size)
        entry = _PromptInFlight(seq=seq, keys=keys, published=seq.num_computed // self.allocator.page_size)
        if entry.published >= len(keys):
            return
        for key in keys[entry.published :]:
            if self._owner_computing(key) is None:
                self._page_owner[key] = entry
        self._computing.append(entry)

    def _publish_prompts(self) -> None:
        """Start of a call: the full prompt pages each fresh sequence planned in the calls before enter the prefix
        cache (the steps computing them have launched, and run before any step that reads them). Not at the end
        of the call that plans them: that step may still fail to launch (undo_launch, a row refused), leaving
        pages never written; their sequence then no longer runs and publishes nothing. A sequence whose prompt
        is published through its last full page, or that stopped running, is forgotten."""
        ps, still = self.allocator.page_size, []
        for entry in self._computing:
            seq = entry.seq
            if self._publishes(entry):
                done = min(seq.num_computed, seq.prompt_len) // ps
                if done > entry.published:
                    self._read_cached_copies(seq, self.prefix_cache.insert(seq.req.input_ids[: done * ps], seq.pages))
                    self._disown(entry, done)
                    entry.published = done
                if entry.published < len(entry.keys):
                    still.append(entry)
                    continue
            self._disown(entry, len(entry.keys))
        self._computing = still

    def _read_cached_copies(self, seq: Sequence, cached: list[int]) -> None:
        """`seq`, still running, reads the prefix cache's copy of each prompt page the cache already had when its
        own was published (computed twice at once: another sequence's was cached first) and frees its own: else
        its copies stay held beside the cache's, pinned under `seq`'s later pages, and the pool is short by them
        until `seq` ends. Its steps launched so far were given its old page list (a new list is made here)."""
        own = seq.pages
        twice = [i for i, p in enumerate(cached) if p != own[i]]
        if not twice:
            return
        self.allocator.retain([cached[i] for i in twice])
        self.allocator.release([own[i] for i in twice])
        seq.pages = cached + own[len(cached) :]

    def _disown(self, entry: _PromptInFlight, upto: int) -> None:
        """Pages [published, upto) of `entry`'s prompt are no longer being computed by it."""
        for key in entry.keys[entry.published : upto]:
            if self._page_owner.get(key) is entry:
                del self._page_owner[key]

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
        input_ids = [0] * n if start >= known else seq.tokens_slice(start, min(end, known)) + [0] * max(0, end - known)
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
        """`_entry` of a decoding sequence (`decodes_token_in_flight`), built directly: at hundreds of rows
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
        if sp.repetition_penalty != 1.0:
            entry.prompt_ids = seq.distinct_prompt_ids()
        if entry.step < sp.min_new_tokens:
            if seq.banned_ids is None:
                seq.banned_ids = sorted(set(sp.stop_token_ids) | (set() if sp.ignore_eos else self.eos_token_ids))
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

    def _match_prefix(self, seq: Sequence) -> None:
        """Take cached pages for the prompt's prefix, leaving at least one token to compute."""
        if self.prefix_cache is None:
            return
        pages = self.prefix_cache.match(seq.token_ids[: self._match_limit(seq)])
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
            self.prefix_cache.insert(seq.token_ids[: seq.num_computed], seq.pages)
        self._drop_pages(seq)

    def invalidate_cache(self) -> None:
        """The weights changed: drop every cached prefix, and keep the KV of sequences still holding pages (a
        pause in place froze them) out of the cache when they finish. Their own pages stay theirs."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset()
        self.cache_epoch += 1

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
