"""What streaming costs the engine's process per token, on the host: the scheduler thread's
`OutputStreamer.append_token` + `emit` (one GenerateOutput per running streamed request per step) against
`append_token` alone (a request that is not streamed: its output is built once, when it finishes), and what
the front end's pipe adds on its sender thread (`output_rows` + pickling one step's message,
engine/service.py). No device is involved: this is the Python that shares the engine process's interpreter
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
from hotswap.sampling_params import SamplingParams  # noqa: E402
from hotswap.scheduler.output_streamer import OutputStreamer  # noqa: E402
from hotswap.scheduler.sequence import Sequence  # noqa: E402
from hotswap.server.app import make_garbage_collections_rare  # noqa: E402


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

    def make(stream: bool) -> list[Sequence]:
        return [Sequence(req=p.GenerateRequest(rid=f"{i:032x}", input_ids=list(range(args.prompt)), sampling_params=sp, seed=i,
                                               sink=sink, flush=lambda: None, stream=stream)) for i in range(args.rows)]

    streamer = OutputStreamer(tokenizer=NoDecodeTokenizer(), eos_token_ids=frozenset({-1}), max_context_len=1 << 40)
    timings: dict[str, float] = {}
    for label, seqs, emit in (("not streamed (peer): append_token", make(False), False),
                              ("streamed: append_token + emit + flush", make(True), True)):
        t, sent = time.perf_counter(), 0
        for step in range(args.steps):
            for seq in seqs:
                streamer.append_token(seq, 7 + step, -1.5, [], "default")
                if emit:
                    streamer.emit(seq, "default")
            streamer.flush()
            sent += len(step_outputs)
            step_outputs.clear()
        timings[label] = time.perf_counter() - t
        if sent != (args.rows * args.steps if emit else 0) or any(s.finish_reason is not None for s in seqs):
            raise SystemExit(f"{label}: {sent} outputs for {args.rows} x {args.steps} tokens, or a request finished early")
    seqs = make(True)
    for seq in seqs:
        streamer.append_token(seq, 7, -1.5, [], "default")
        streamer.emit(seq, "default")
    outs, reps = list(step_outputs), max(20, args.steps // 4)
    t = time.perf_counter()
    for _ in range(reps):
        ForkingPickler.dumps(("outputs", output_rows(outs)))
    pipe_s = (time.perf_counter() - t) / reps
    tokens = args.rows * args.steps
    peer, streamed = timings.values()
    rows = [[label, f"{s / args.steps * 1e3:.3f}", f"{s / tokens * 1e6:.2f}"] for label, s in timings.items()]
    rows.append(["streamed, the difference (the scheduler thread's cost of streaming)", f"{(streamed - peer) / args.steps * 1e3:.3f}",
                 f"{(streamed - peer) / tokens * 1e6:.2f}"])
    rows.append(["front end pipe, sender thread: output_rows + pickle of one step", f"{pipe_s * 1e3:.3f}", f"{pipe_s / args.rows * 1e6:.2f}"])
    print_table(f"stream_output_cost: {args.rows} streamed requests x {args.steps} steps, logprobs on, prompt {args.prompt} tokens "
                f"(host only, Python {sys.version.split()[0]}, collector thresholds {gc.get_threshold()})", ["what", "ms a step", "us a token"], rows)


if __name__ == "__main__":
    main()
