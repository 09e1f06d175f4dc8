"""A torch.distributed group shared between a trainer and engines, made the way RL frameworks make it for
SGLang: a TCP rendezvous at the trainer (rank 0), a store prefixed by `group_name`, broadcasts from rank 0.

Both sides call `init_custom_process_group`; it never creates or touches the default process group, so
an engine with its own tensor-parallel group, or a trainer with its own data-parallel world, can join any
number of such groups.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous


def short_error(exc: BaseException) -> str:
    """The first line of a c10d error (they carry a C++ stack trace after it)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def tcp_init_method(host: str, port: int) -> str:
    """`tcp://host:port`, an IPv6 literal bracketed (given bare or bracketed, as SGLang's NetworkAddress takes it)."""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def init_custom_process_group(*, backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta) -> dist.ProcessGroup:
    """Join (rank > 0) or create (rank 0: the TCP store lives here) a group with its own store namespace.

    Blocks until all `world_size` ranks arrive or `timeout` passes. torch keys the group's store entries
    by its process-local name, so every rank registers it under `group_name`; one process cannot hold two
    ranks of the same group (a trainer and an in-process engine in one interpreter): that is refused at once.
    """
    token = _reserve_name(group_name)
    try:
        store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
        store = PrefixStore(group_name, store)
        pg, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    finally:
        with _names_lock:
            if _reserved_names.get(group_name) is token:
                del _reserved_names[group_name]
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


_names_lock = threading.Lock()
_reserved_names: dict[str, object] = {}  # groups being created right now (creation blocks: no lock is held meanwhile)


def _reserve_name(group_name: str) -> object:
    with _names_lock:
        if group_name in _reserved_names or group_name in _world.pg_names.values():
            raise ValueError(f"this process already holds (or is creating) a process group named {group_name!r}; a trainer and an "
                             "engine cannot share a weights update group inside one interpreter, and group names must be unique")
        token = _reserved_names[group_name] = object()
        return token


def forget_reservation(group_name: str) -> None:
    """A creation that was given up (its rendezvous never answered) no longer holds its name: a retry may
    take it. Should the abandoned one ever get that far, creating the group under a taken name fails."""
    with _names_lock:
        _reserved_names.pop(group_name, None)


def destroy_custom_process_group(pg: dist.ProcessGroup) -> None:
    """Destroy a group made by `init_custom_process_group`; a group already gone is not an error."""
    if _world.pg_map.get(pg) is None:
        return
    dist.destroy_process_group(pg)


def wait_work(work, timeout_s: float | None) -> None:
    """Wait for an async collective, at most `timeout_s` (None: the group's own timeout)."""
    if timeout_s is None:
        work.wait()
    else:
        work.wait(timeout=timedelta(seconds=timeout_s))


def retire_process_group(doomed: list) -> None:
    """Destroy a group whose collectives failed, together with its in-flight work, in a daemon thread.

    `doomed` holds the ProcessGroup and the Work objects still in flight; they are moved out (the list is
    left empty) and the caller must hold no other reference to them: with an operation in flight, the last
    release of a gloo group or work blocks until the group's own timeout. That has to happen in this
    thread, never in the caller's (the engine's scheduler, the trainer's loop)."""
    owned = list(doomed)
    doomed.clear()

    def reap() -> None:
        for obj in owned:
            if isinstance(obj, dist.ProcessGroup):
                try:
                    destroy_custom_process_group(obj)
                except Exception:
                    pass
        owned.clear()  # the blocking releases happen here, in this thread

    threading.Thread(target=reap, name="hotswap-retire-group", daemon=True).start()
