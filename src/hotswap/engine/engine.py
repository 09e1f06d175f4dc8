"""`Engine`: the model, its runner and the scheduler thread in this process, under the EngineAPI (the
offline Python API, SGLang's shapes)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from hotswap import protocol as p
from hotswap.config import EngineConfig, engine_args_from_sglang, model_config_for
from hotswap.engine.api import EngineAPI, context_length, eos_token_ids
from hotswap.engine.tokenizer import load_tokenizer, skips_tokenizer
from hotswap.errors import HotswapError
from hotswap.gc_policy import make_garbage_collections_rare
from hotswap.runner.model_runner import ModelRunner
from hotswap.runner.tp_peers import TPPeers
from hotswap.scheduler.scheduler import Scheduler

log = logging.getLogger("hotswap.engine")


def _fields_of(server_args) -> dict:
    """A ServerArgs dataclass's fields (or a dict of them)."""
    if dataclasses.is_dataclass(server_args) and not isinstance(server_args, type):
        return {f.name: getattr(server_args, f.name) for f in dataclasses.fields(server_args)}
    if isinstance(server_args, dict):
        return dict(server_args)
    raise HotswapError(f"server_args must be a ServerArgs dataclass or a dict of its fields, got {type(server_args).__name__}")


class Engine(EngineAPI):
    """An inference engine on one model replica.

    `Engine(model_path, dtype="auto", device="auto", **engine_args)` where engine_args are EngineConfig
    fields (page_size, num_pages, max_running_requests, ...). Usable as a context manager.

    `tensor_parallel_size=N` spawns N-1 worker processes (so a script that builds one needs the usual
    `if __name__ == "__main__":` guard); this process is rank 0 and schedules for all of them.

    SGLang's ServerArgs names are accepted too (`Engine(**server_args)` or `Engine(server_args=ServerArgs(...))` as
    frameworks build it: `tp_size`,
    `mem_fraction_static`, `disable_radix_cache`, `random_seed`, `context_length`, ...); a setting hotswap
    cannot honour is refused by name (config.engine_args_from_sglang).
    """

    def __init__(self, model_path: str | None = None, dtype: str | None = "auto", device: str | None = "auto", *, server_args=None,
                 **engine_args):
        if server_args is not None:  # SGLang's Engine(server_args=ServerArgs(...)): its fields, under those given beside it
            engine_args = {**_fields_of(server_args), **engine_args}
            model_path = model_path if model_path is not None else engine_args.pop("model_path", None)
            dtype, device = engine_args.pop("dtype", dtype), engine_args.pop("device", device)
        if model_path is None:
            raise HotswapError("model_path is required")
        engine_args = engine_args_from_sglang(engine_args)
        config = EngineConfig(model_path=str(model_path), dtype=dtype or "auto", device=device or "auto", **engine_args)  # None: SGLang's auto
        if skips_tokenizer(config):
            log.info("skip_tokenizer_init: no tokenizer loaded; requests give input_ids, replies carry output_ids and no text")
        device = config.resolved_device()
        model_config = model_config_for(config)
        tokenizer = load_tokenizer(config)
        make_garbage_collections_rare()  # the scheduler thread allocates per row per step (gc_policy.py)
        self.config, self.model_config, self.device = config, model_config, device  # _start_runner reads them
        self.tp_peers: TPPeers | None = None
        # the runner captures CUDA graphs on its device; the caller's current device is left as it was
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.model_runner = self._start_runner()
        scheduler = Scheduler(config, self.model_runner, tokenizer, eos_token_ids(model_config, tokenizer), context_length(config, model_config))
        super().__init__(config, model_config, device, tokenizer, scheduler, scheduler.streamer.detokenizer)
        self.accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.scheduler: Scheduler = scheduler  # the thread itself (tests and benches read its state)
        scheduler.start()
        if config.weight_version != "default":  # SGLang's --weight-version: the launch weights' name
            named = self._call(p.UpdateWeightVersionRequest(new_version=config.weight_version, abort_all_requests=False))
            if not named.success:  # refused (too long, say): fail the launch rather than serve under "default"
                self.shutdown()
                raise HotswapError(f"weight_version: {named.message}")

    def _start_runner(self) -> ModelRunner:
        """This process's ModelRunner; under tensor parallelism the workers are spawned first and build
        theirs meanwhile (a worker's startup error is raised here, naming it)."""
        if self.config.tensor_parallel_size == 1:
            return ModelRunner(self.config, self.model_config, self.device)
        peers = self.tp_peers = TPPeers.launch(self.config, self.device)
        try:
            runner = ModelRunner(self.config, self.model_config, self.device, peers.info, tp_peers=peers)
            peers.wait_ready()
        except BaseException as exc:
            peers.shutdown()
            reason = None if isinstance(exc, HotswapError) else peers.worker_error()  # a collective failed: say why
            if reason is None:
                raise
            raise HotswapError(reason) from exc
        return runner

    def failure(self) -> str | None:
        """Why this engine can serve nothing any more (its scheduler stopped on an error or a step hung past
        `step_timeout_s`, a tensor-parallel worker died or stopped answering), or None. `hotswap serve` polls it and
        exits, as SGLang's server does when a rank fails."""
        if (dead := super().failure()) is not None:
            return dead
        tp = None if self.tp_peers is None else self.tp_peers.check_workers()  # names the worker: before the watchdog's
        return tp or self.scheduler.watchdog.expired

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.submit(p.AbortRequest(message="engine shutting down"))
            self.scheduler.stop()
            if self.tp_peers is not None:
                self.tp_peers.shutdown()
            if not self.scheduler.thread.is_alive():  # a stuck step keeps its state rather than crash under it
                self.scheduler.close_weights()
                self.model_runner.close()
