"""What streaming costs the engine's process per token, on the host: the scheduler thread's
`OutputStreamer.append_token` + `emit` (one GenerateOutput per running streamed request per step) against
`append_token` alone (a request that is not streamed: its output is built once, when it finishes), the same
streamed to the front end process's pipe (each plain next token a token row, `GenerateRequest.sink_token`, no
GenerateOutput made), and what the pipe adds on its sender thread (pickling one step's message,
engine/service.py), both ways. No device is involved: this is the Python that shares the engine process's interpreter
lock with the scheduler's step loop. The garbage collector is set as the serving processes set it
(`make_garbage_collections_rare`); `--default-gc` keeps CPython's default thresholds.

    python bench/stream_output_cost.py --rows 512 --steps 200
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table  # noqa: E402

from hotswap import protocol as p  # noqa: E402
from hotswap.engine.service import output_rows  # noqa: E402
from hotswap.gc_policy import make_garbage_collections_rare  # noqa: E402
from hotswap.sampling_params import SamplingParams  # noqa: E402
from hotswap.scheduler.output_streamer import OutputStreamer  # noqa: E402
from hotswap.scheduler.sequence import Sequence  # noqa: E402


class NoDecodeTokenizer:
    """Requests without stop strings are never detokenized on the scheduler thread."""

    def decode(self, ids, skip_special_tokens=True):
        raise AssertionError("no decode expected")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512, help="streamed requests running each step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--default-gc", action="store_true", help="CPython's collector thresholds, not the serving processes'")
    args = ap.parse_args()
    if not args.default_gc:
        make_garbage_collections_rare()
    sp = SamplingParams(temperature=1.0, max_new_tokens=1 << 30, return_logprob=True)
    step_outputs: list[p.GenerateOutput] = []
    lock = threading.Lock()

    def sink(out: p.GenerateOutput) -> None:  # as EngineService._sink: append under a lock
        with lock:
            step_outputs.append(out)

    step_tokens: list[tuple] = []

    def make(stream: bool, rows: bool = False) -> list[Sequence]:
        seqs = [Sequence(req=p.GenerateRequest(rid=f"{i:032x}", input_ids=list(range(args.prompt)), sampling_params=sp, seed=i,
                                               sink=sink, flush=lambda: None, stream=stream, sink_token=step_tokens.append if rows else None))
                for i in range(args.rows)]
        for seq in seqs:
            seq.sent_input_logprobs = True  # past the first output, which carries the prompt's logprobs
        return seqs

    streamer = OutputStreamer(tokenizer=NoDecodeTokenizer(), eos_token_ids=frozenset({-1}), max_context_len=1 << 40)
    timings: dict[str, float] = {}
    for label, seqs, emit in (("not streamed (peer): append_token", make(False), False),
                              ("streamed, GenerateOutputs: append_token + emit + flush", make(True), True),
                              ("streamed, token rows (front end process): append_token + emit + flush", make(True, rows=True), True)):
        t, sent = time.perf_counter(), 0
        for step in range(args.steps):
            for seq in seqs:
                streamer.append_token(seq, 7 + step, -1.5, [], "default")
                if emit:
                    streamer.emit(seq, "default")
            streamer.flush()
            sent += len(step_outputs) + len(step_tokens)
            step_outputs.clear()
            step_tokens.clear()
        timings[label] = time.perf_counter() - t
        if sent != (args.rows * args.steps if emit else 0) or any(s.finish_reason is not None for s in seqs):
            raise SystemExit(f"{label}: {sent} outputs for {args.rows} x {args.steps} tokens, or a request finished early")
    for seq in make(True) + make(True, rows=True):
        streamer.append_token(seq, 7, -1.5, [], "default")
        streamer.emit(seq, "default")
    outs, toks, reps = list(step_outputs), list(step_tokens), max(20, args.steps // 4)
    pipe_s = []
    for message in (lambda: ("outputs", output_rows(outs), []), lambda: ("outputs", [], toks)):
        t = time.perf_counter()
        for _ in range(reps):
            ForkingPickler.dumps(message())
        pipe_s.append((time.perf_counter() - t) / reps)
    tokens = args.rows * args.steps
    peer, streamed, streamed_rows = timings.values()
    rows = [[label, f"{s / args.steps * 1e3:.3f}", f"{s / tokens * 1e6:.2f}"] for label, s in timings.items()]
    for what, s in (("GenerateOutputs", streamed), ("token rows", streamed_rows)):
        rows.append([f"streamed, {what}: the difference (the scheduler thread's cost of streaming)", f"{(s - peer) / args.steps * 1e3:.3f}",
                     f"{(s - peer) / tokens * 1e6:.2f}"])
    for what, s in zip(("output_rows + pickle of one step's GenerateOutputs", "pickle of one step's token rows"), pipe_s):
        rows.append([f"front end pipe, sender thread: {what}", f"{s * 1e3:.3f}", f"{s / args.rows * 1e6:.2f}"])
    print_table(f"stream_output_cost: {args.rows} streamed requests x {args.steps} steps, logprobs on, prompt {args.prompt} tokens "
                f"(host only, Python {sys.version.split()[0]}, collector thresholds {gc.get_threshold()})", ["what", "ms a step", "us a token"], rows)


if __name__ == "__main__":
    main()
