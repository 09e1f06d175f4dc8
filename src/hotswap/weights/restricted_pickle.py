"""The pickle reader both wire protocols that send pickles share (SGLang's serialized_named_tensors,
checkpoint-engine's ZMQ messages): it runs nothing named on the wire.

Each global a pickle names is looked up in the protocol's table, never by getattr with a name from the
wire, and gives whatever object the table holds for it (a real inert object such as a torch dtype, or a
`GlobalRef` that may be named but not called); every other global is refused by name, and so is every
persistent id. All failures surface as the protocol's own error class.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from hotswap.errors import shown


class Refused(Exception):
    """Raised while unpickling by the inert stand-ins; `restricted_loads` turns it into the protocol's error."""


def refuse_build(self: object, state: object) -> None:
    """The __setstate__ of inert stand-ins: pickle's BUILD would otherwise set a frozen slots dataclass's
    fields from the stream (the dataclass adds a __setstate__ unless the class has one)."""
    raise Refused(f"refused to set the state of {type(self).__name__.lstrip('_')} {self}: payloads never do")


@dataclass(frozen=True, slots=True)
class GlobalRef:
    """A global named in a pickle, kept as its name: calling it is refused."""

    module: str
    name: str
    __setstate__ = refuse_build

    @classmethod
    def of(cls, obj: object) -> GlobalRef:
        """The name pickle writes for a class or function."""
        return cls(obj.__module__, obj.__qualname__)

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"

    def __call__(self, *args: object) -> object:
        raise Refused(f"refused to call {self}: a pickle may name it, it is not callable here")


def is_ref(obj: object, refs: frozenset[GlobalRef]) -> bool:
    """`obj` is one of `refs` (safe on unhashable objects from the wire)."""
    return isinstance(obj, GlobalRef) and obj in refs


# torch dtypes and torch.Size: the real objects (constructing them runs nothing of consequence)
TORCH_VALUES: dict[GlobalRef, object] = {
    **{GlobalRef("torch", name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)},
    GlobalRef("torch", "Size"): torch.Size,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class PickleRules:
    """What one protocol's pickles may name, how large one may be, and how its refusals read."""

    source: str  # the protocol's pickles, as refusals name them ("checkpoint-engine messages")
    unit: str  # one pickle of the protocol ("message")
    error: type[Exception]
    allowed: Mapping[GlobalRef, object]  # each global a pickle may name -> what unpickling gives for it
    max_bytes: int
    why_refused: Mapping[GlobalRef, str] = field(default_factory=dict)  # better reasons than "never name it"


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, rules: PickleRules) -> None:
        super().__init__(io.BytesIO(data))
        self._rules = rules

    def find_class(self, module: str, name: str) -> object:
        ref = GlobalRef(module, name)
        if ref in self._rules.allowed:
            return self._rules.allowed[ref]
        why = self._rules.why_refused.get(ref, f"{self._rules.source} never name it")
        raise Refused(f"refused to unpickle global {module}.{name}: {why}")

    def persistent_load(self, pid: object) -> object:
        raise Refused(f"refused a pickle persistent id {shown(pid)}: {self._rules.source} carry none")


def restricted_loads(data: bytes | bytearray | memoryview, rules: PickleRules) -> object:
    """Unpickle one pickle under `rules`; raises `rules.error` naming what was refused or malformed."""
    if len(data) > rules.max_bytes:
        raise rules.error(f"{rules.unit} of {len(data)} bytes exceeds the {rules.max_bytes}-byte limit")
    try:
        return _Unpickler(data, rules).load()
    except Refused as exc:
        raise rules.error(str(exc)) from None
    except rules.error:
        raise
    except Exception as exc:  # a malformed pickle raises anything from EOFError to TypeError
        raise rules.error(f"undecodable {rules.unit}: {type(exc).__name__}: {exc}") from None
