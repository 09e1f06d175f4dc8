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


# what a dict key or set item from the wire may be. Hashing a key costs its size, and a pickle's memo shares one object
# under many names: a 109-byte tuple nested 40 deep, as a dict key, hashes for hours inside the unpickler (a security
# review's finding). The protocols key by names and numbers only.
_FLAT_KEYS = (str, bytes, int, float, bool, type(None), torch.dtype, GlobalRef)


def _check_keys(keys: list) -> None:
    for key in keys:
        if not isinstance(key, _FLAT_KEYS):
            raise Refused(f"refused a {type(key).__name__} as a dict key or set item: payloads key by names and numbers only")


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (its opcodes can be checked one at a time, unlike the C one's): every dict key and set
    item is checked flat before it is hashed (`_FLAT_KEYS`). It costs ~35 us per tensor of a per-tensor payload
    (92 opcodes a CPU tensor's pickle), against ~3.5 us in C; flattened buckets are a few dozen opcodes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, rules: PickleRules) -> None:
        super().__init__(io.BytesIO(data))
        self._rules = rules

    def load_setitem(self) -> None:
        _check_keys([self.stack[-2]])
        super().load_setitem()

    def load_setitems(self) -> None:
        items = self.pop_mark()
        _check_keys(items[0::2])
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_dict(self) -> None:
        items = self.pop_mark()
        _check_keys(items[0::2])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def load_additems(self) -> None:
        items = self.pop_mark()
        _check_keys(items)
        target = self.stack[-1]
        for item in items:
            target.add(item)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        _check_keys(items)
        self.append(frozenset(items))

    for _opcode, _load in ((pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems), (pickle.DICT, load_dict),
                           (pickle.ADDITEMS, load_additems), (pickle.FROZENSET, load_frozenset)):
        dispatch[_opcode[0]] = _load
    del _opcode, _load

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
