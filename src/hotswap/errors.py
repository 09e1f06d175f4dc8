"""Error types. Every user-facing error is a ValueError subclass so callers can catch bad input uniformly."""

import reprlib


class HotswapError(ValueError):
    """Bad input or a request the engine refuses; the message names what was wrong."""


class CheckpointError(HotswapError):
    """A folder is not a loadable checkpoint, or its tensors do not fit the model."""


class UnsupportedModelError(HotswapError):
    """The checkpoint's architecture is not one hotswap implements."""


class SamplingParamsError(HotswapError):
    """A sampling parameter is unknown or out of range."""


class ConstrainedDecodingError(SamplingParamsError):
    """A constrained-decoding field (regex, json_schema, ...) is set; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # crosses the front end's pipe (pickle rebuilds an exception from its args alone)
        return (type(self), (self.field, str(self)))


class UnservedFieldError(HotswapError):
    """An SGLang request field hotswap does not serve is set (engine/unserved.py); `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # crosses the front end's pipe, as ConstrainedDecodingError does
        return (type(self), (self.field, str(self)))


class EngineUnavailableError(HotswapError):
    """Generation cannot run now (memory released, or held past the queue bound); the message says why.
    Over HTTP: 503."""


def duplicate_rid_message(taken: list[str]) -> str:
    """SGLang's duplicate-rid refusal (tokenizer_manager: "Duplicate request ID detected"), in one wording for the
    engine's own check and for the one across a server's front end processes (engine/service.py)."""
    return f"duplicate request id: {', '.join(map(repr, taken))} is already running"


class BatchRowError(HotswapError):
    """One row of a batch cannot run (found before the forward): that request fails alone and the rest of
    the batch runs without it. `entry` is the row's BatchEntry."""

    def __init__(self, entry: object, message: str):
        super().__init__(message)
        self.entry = entry

    def __reduce__(self):
        return (type(self), (self.entry, str(self)))


_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxlevel = 160, 160, 16, 16, 3


def shown(value: object) -> str:
    """A client's value as an error message quotes it: its repr, cut short (a hostile one may be a
    megabyte-long string or a list of a million items, which the reply must not echo back)."""
    return _SHOWN.repr(value)
