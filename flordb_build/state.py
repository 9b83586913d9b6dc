"""Training state as checkpoints: consistent copies, serialization, and restoring in place.

Three steps, on two threads:

    training thread                      materializer thread
    copy_state(obj) -> StateCopy  ---->  serialize(copy) -> bytes -> object store
    (tensors cloned to host memory,
     so training may mutate them next)

    restore: deserialize(bytes, fmt) -> restore_into(live_obj, loaded)   (in place)

Objects with ``state_dict``/``load_state_dict`` (torch modules, optimizers, LR schedulers) are
saved as their state dicts; tensors, numpy arrays and dicts/lists of them as themselves; any
other picklable object through cloudpickle. Formats are chosen so that the default restore
(``weights_only=True``) never runs pickled code: torch trees load with torch's weights-only
unpickler (numpy arrays allow-listed), plain values as JSON, numpy arrays with
``allow_pickle=False``; only the ``pickle`` format needs the caller's explicit opt-in.
torch and numpy are never imported here unless the user's objects already come from them.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import CheckpointError

_IMMUTABLE = (int, float, complex, str, bytes, bool, tuple, frozenset, type(None))
_PRIMITIVE = (type(None), bool, int, float, str, bytes)


class StateFormat(StrEnum):
    """How a checkpointed object's bytes are encoded (the ``format`` column of ``checkpoints``)."""

    TORCH = "torch"
    NUMPY = "numpy"
    JSON = "json"
    PICKLE = "pickle"
    BYTES = "bytes"  # a file's contents, as they were (training_state.py's written files)


@dataclass(frozen=True)
class StateCopy:
    """A consistent copy of one object's state, detached from the live object."""

    format: StateFormat
    payload: Any  # a copied tree (torch/json), an ndarray (numpy) or pickled bytes (pickle)
    nbytes: int  # tensor and array bytes in the payload (what serialization will mostly cost)


class _NotPlainError(Exception):
    """A tree holds a value that only pickle can carry."""


def is_stateful(obj: object) -> bool:
    """True for objects saved and restored through ``state_dict``/``load_state_dict``."""
    return (
        not isinstance(obj, type)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def check_checkpointable(name: str, obj: object) -> None:
    """Refuse objects that cannot be restored in place (immutable values)."""
    if isinstance(obj, _IMMUTABLE):
        raise CheckpointError(
            f"flor.checkpointing cannot restore '{name}' ({type(obj).__name__}) in place because it is "
            f"immutable; checkpoint a dict or an object that holds it, e.g. flor.checkpointing(state={{'{name}': ...}})."
        )


def _torch() -> Any:
    return sys.modules.get("torch")


def _numpy() -> Any:
    return sys.modules.get("numpy")


def estimate_nbytes(obj: object) -> int:
    """Bytes of tensors and arrays reachable from ``obj`` without copying anything (0 if unknown)."""
    torch, np = _torch(), _numpy()
    if is_stateful(obj):
        return estimate_nbytes(obj.state_dict())  # type: ignore[attr-defined]
    if torch is not None and isinstance(obj, torch.Tensor):
        return int(obj.numel() * obj.element_size())
    if np is not None and isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(estimate_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(estimate_nbytes(v) for v in obj)
    return 0


def copy_state(obj: object) -> StateCopy:
    """Take a consistent copy of ``obj``'s state on the calling (training) thread.

    Tensors are copied to host memory (``.to('cpu', copy=True)``), so later in-place updates by
    the optimizer, on CPU or GPU, cannot leak into the checkpoint being written.
    """
    torch, np = _torch(), _numpy()
    if np is not None and isinstance(obj, np.ndarray) and obj.dtype != object:
        return StateCopy(StateFormat.NUMPY, obj.copy(), int(obj.nbytes))
    source = obj.state_dict() if is_stateful(obj) else obj  # type: ignore[attr-defined]
    if is_stateful(obj) and isinstance(source, dict) and not source:
        return StateCopy(StateFormat.JSON, {}, 0)  # no state: '{}', which replay planning reads as such (12.7)
    is_tree = isinstance(source, dict | list) or (torch is not None and isinstance(source, torch.Tensor))
    if is_tree:
        counter = [0, False]
        try:
            tree = _copy_tree(source, torch, np, counter)
        except _NotPlainError:
            pass
        else:
            if counter[1]:  # tensors or arrays inside: torch's format keeps them binary
                if torch is None:
                    return _pickled(source)
                return StateCopy(StateFormat.TORCH, tree, int(counter[0]))
            if _is_json_plain(tree):
                return StateCopy(StateFormat.JSON, tree, 0)
            if torch is not None:
                return StateCopy(StateFormat.TORCH, tree, 0)
    # a stateful object whose state_dict holds arbitrary values: pickle the state, not the object
    return _pickled(source)


def _pickled(obj: object) -> StateCopy:
    # An arbitrary object cannot be copied more cheaply than by pickling it, so the pickling
    # itself is the consistent copy; the materializer only hashes and writes the bytes.
    try:
        import cloudpickle

        data = cloudpickle.dumps(obj)
    except ImportError:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise CheckpointError(f"Could not pickle a {type(obj).__name__} for a checkpoint: {exc}.") from exc
    return StateCopy(StateFormat.PICKLE, data, len(data))


def _copy_tree(x: Any, torch: Any, np: Any, counter: list[Any]) -> Any:
    if isinstance(x, _PRIMITIVE):
        return x
    if torch is not None and isinstance(x, torch.Tensor):
        counter[0] += x.numel() * x.element_size()
        counter[1] = True
        return x.detach().to("cpu", copy=True)
    if np is not None and isinstance(x, np.ndarray) and x.dtype != object:
        counter[0] += x.nbytes
        counter[1] = True
        return x.copy()
    if is_stateful(x):
        return _copy_tree(x.state_dict(), torch, np, counter)
    if isinstance(x, dict):
        copied: dict[Any, Any] = OrderedDict() if isinstance(x, OrderedDict) else {}
        for key, value in x.items():
            if not isinstance(key, _PRIMITIVE):
                raise _NotPlainError
            copied[key] = _copy_tree(value, torch, np, counter)
        metadata = getattr(x, "_metadata", None)  # module state_dicts carry per-module versions
        if metadata is not None:
            copied._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
        return copied
    if isinstance(x, list | tuple) and type(x) in (list, tuple):
        items = [_copy_tree(v, torch, np, counter) for v in x]
        return items if isinstance(x, list) else tuple(items)
    raise _NotPlainError


def matches_copy(obj: object, copy: StateCopy) -> bool:
    """True when ``obj``'s state is, bit for bit, the state ``copy`` holds (a :func:`copy_state` of it
    taken earlier), so that ``copy`` can stand for a new one; False wherever that is not certain.

    A checkpoint at an iteration's end that follows one at its nested point (CheckpointPoint)
    reuses the nested copy of each object the rest of the iteration left alone, instead of
    copying, serializing and hashing the same bytes again. Comparing costs a read of both
    (a few ms for tens of MB); the copy, torch.save and sha256 it saves cost ten times that.
    Only torch trees on the CPU and plain (JSON) trees are compared; anything else (numpy arrays,
    pickled objects, GPU tensors) answers False and is copied again, which is never wrong, only slower.
    """
    if copy.format not in (StateFormat.TORCH, StateFormat.JSON):
        return False
    source = obj.state_dict() if is_stateful(obj) else obj  # type: ignore[attr-defined]
    return tree_matches(source, copy.payload)


def tree_matches(live: Any, copied: Any) -> bool:
    """True when the tree ``live`` (dicts, lists, tuples, primitives, CPU tensors) is bit for bit
    the copied tree ``copied``: same types, keys in the same order, same dtypes and shapes, same
    bytes (-0.0 is not 0.0, and a NaN matches only its own bits)."""
    torch = _torch()
    if torch is not None and isinstance(live, torch.Tensor):
        return isinstance(copied, torch.Tensor) and _same_tensor_bits(live, copied, torch)
    if type(live) is not type(copied):
        return False
    if isinstance(live, float):
        return struct.pack("<d", live) == struct.pack("<d", copied)
    if isinstance(live, _PRIMITIVE):
        return bool(live == copied)
    if isinstance(live, dict):
        if list(live) != list(copied) or any(type(a) is not type(b) for a, b in zip(live, copied, strict=True)):
            return False
        if not _same_metadata(getattr(live, "_metadata", None), getattr(copied, "_metadata", None)):
            return False
        return all(tree_matches(live[key], copied[key]) for key in live)
    if isinstance(live, list | tuple):
        return len(live) == len(copied) and all(tree_matches(a, b) for a, b in zip(live, copied, strict=True))
    return False


#: Integer dtypes by element size: a tensor viewed as one of these compares its bits, not its values.
_BITS_DTYPE_NAMES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _same_tensor_bits(live: Any, copied: Any, torch: Any) -> bool:
    if live.device.type != "cpu" or copied.device.type != "cpu":
        return False  # comparing would cost the transfer a copy costs
    if live.layout != torch.strided or live.is_quantized or live.dtype != copied.dtype or live.shape != copied.shape:
        return False
    bits = _BITS_DTYPE_NAMES.get(live.element_size())
    if bits is None:
        return False
    dtype = getattr(torch, bits)
    live, copied = live.detach(), copied.detach()
    if live.dtype != dtype:
        live, copied = live.view(dtype), copied.view(dtype)
    return bool(torch.equal(live, copied))


def _same_metadata(live: Any, copied: Any) -> bool:
    # _copy_tree copies a module state_dict's _metadata as an OrderedDict of dicts
    if live is None or copied is None:
        return live is None and copied is None
    return list(live) == list(copied) and all(dict(live[key]) == copied[key] for key in live)


def _is_json_plain(x: Any) -> bool:
    if x is None or type(x) in (bool, int, float, str):
        return True
    if type(x) is list:
        return all(_is_json_plain(v) for v in x)
    if type(x) is dict:
        return all(type(k) is str and _is_json_plain(v) for k, v in x.items())
    return False


def serialize(copy: StateCopy) -> bytes | memoryview:
    """Encode a state copy as bytes (runs on the materializer thread)."""
    if copy.format in (StateFormat.PICKLE, StateFormat.BYTES):
        data: bytes = copy.payload
        return data
    if copy.format is StateFormat.JSON:
        return json.dumps(copy.payload, allow_nan=True, separators=(",", ":")).encode()
    buffer = io.BytesIO()
    if copy.format is StateFormat.NUMPY:
        import numpy as np

        np.save(buffer, copy.payload, allow_pickle=False)
    else:
        import torch

        torch.save(copy.payload, buffer)
    return buffer.getbuffer()  # a view, not a copy: checkpoints can be gigabytes


def deserialize(data: bytes, fmt: str, *, map_location: Any = None, weights_only: bool = True) -> Any:
    """Decode bytes written by :func:`serialize`.

    :raises CheckpointError: unknown format, torch missing, or a pickle with ``weights_only``.
    """
    try:
        state_format = StateFormat(fmt)
    except ValueError:
        raise CheckpointError(f"Unknown checkpoint format '{fmt}'; was it written by a newer flordb_build?") from None
    if state_format is StateFormat.JSON:
        return json.loads(data)
    if state_format is StateFormat.BYTES:
        return bytes(data)
    if state_format is StateFormat.NUMPY:
        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)
    if state_format is StateFormat.PICKLE:
        if weights_only:
            raise CheckpointError(
                "this object was saved with cloudpickle, and unpickling can run arbitrary code; "
                "pass weights_only=False if you trust this checkpoint"
            )
        return pickle.loads(data)  # cloudpickle output loads with the standard unpickler
    try:
        import torch
    except ImportError:
        raise CheckpointError("this checkpoint holds torch tensors; install torch to load it: pip install torch") from None
    buffer = io.BytesIO(data)
    if not weights_only:
        return torch.load(buffer, map_location=map_location, weights_only=False)
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(buffer, map_location=map_location, weights_only=True)


def _numpy_safe_globals() -> list[Any]:
    # Plain numeric arrays are data, not code: allow numpy's array reconstruction in the
    # weights-only unpickler, but nothing else (object arrays still need their classes).
    np = _numpy()
    if np is None:
        return []
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    _reconstruct = core.multiarray._reconstruct
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def restore_into(obj: Any, loaded: Any, name: str) -> Any:
    """Put ``loaded`` state into the live ``obj`` in place; return the object to use afterwards.

    :raises CheckpointError: the live object cannot take the state (shape, keys or type differ).
    """
    try:
        return _restore(obj, loaded)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"Could not restore '{name}' ({type(obj).__name__}) from its checkpoint: {exc}. "
            "Pass an object built like the one that was checkpointed."
        ) from exc


def _restore(obj: Any, loaded: Any) -> Any:
    torch, np = _torch(), _numpy()
    if is_stateful(obj) and not isinstance(loaded, type(obj)):
        obj.load_state_dict(loaded)
        return obj
    if torch is not None and isinstance(obj, torch.Tensor):
        with torch.no_grad():
            if tuple(obj.shape) != tuple(loaded.shape):
                raise CheckpointError(f"tensor shape {tuple(obj.shape)} differs from the checkpoint's {tuple(loaded.shape)}")
            obj.copy_(loaded)
        return obj
    if np is not None and isinstance(obj, np.ndarray):
        if obj.shape != loaded.shape:
            raise CheckpointError(f"array shape {obj.shape} differs from the checkpoint's {loaded.shape}")
        obj[...] = loaded
        return obj
    if isinstance(obj, dict) and isinstance(loaded, dict):
        for key in [k for k in obj if k not in loaded]:
            del obj[key]
        for key, value in loaded.items():
            obj[key] = _restore(obj[key], value) if key in obj and _restorable(obj[key]) else value
        return obj
    if isinstance(obj, list) and isinstance(loaded, list | tuple):
        if len(obj) == len(loaded):
            obj[:] = [_restore(o, v) if _restorable(o) else v for o, v in zip(obj, loaded, strict=True)]
        else:
            obj[:] = list(loaded)
        return obj
    if isinstance(obj, set | bytearray) and type(loaded) is type(obj):
        if isinstance(obj, set):
            obj.clear()
            obj.update(loaded)
        else:
            obj[:] = loaded
        return obj
    # cloudpickle pickles classes of __main__ by value, so a restored object's class is a copy
    # of the live one's: compare qualified names, not identity.
    if type(loaded).__qualname__ == type(obj).__qualname__ and hasattr(obj, "__dict__") and hasattr(loaded, "__dict__"):
        obj.__dict__.clear()
        obj.__dict__.update(loaded.__dict__)
        return obj
    raise CheckpointError(
        f"a {type(obj).__name__} cannot take a checkpointed {type(loaded).__name__} in place"
    )


def _restorable(obj: Any) -> bool:
    return not isinstance(obj, _IMMUTABLE)
