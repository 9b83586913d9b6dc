"""Training state no ``flor.checkpointing`` object holds: random generators, gradients, written files.

A replay that restores a checkpoint and runs on must see the state the record had there, not
only the model's weights and the optimizer's moments:

- **random number generators**: a statement after the skipped loop that draws random numbers
  (``torch.randn``, dropout, ``np.random``, ``random``), and every range segment that starts from a
  checkpoint (its shuffles, its dropout masks), draws what the record drew only if Python's
  ``random``, numpy's global generator, torch's CPU generator and every CUDA device's generator
  are where they were. One JSON object, ``flor.rng``, holds them all;
- **gradients**: FlorDB's README logs ``gradient_norm`` at the top of the epoch loop (the previous
  epoch's last step). A module's ``state_dict`` has no gradients, so each checkpointed torch module
  also gets ``<name>.grad``: its parameters' gradients (``None`` where a parameter has none);
- **files the run wrote**: the best model saved to a git-ignored ``model.pt`` inside the loop, read
  by the code after it. Each checkpoint keeps the current contents of every project file the run
  has opened for writing (written_files.py) as ``flor.file:<path>``; an unchanged file is the same
  object in the store, so only a changed one costs space.

All are taken with every checkpoint, on the training thread (a consistent copy, like the objects'
own), and stored as objects of that checkpoint under those names (a ``flor.checkpointing`` keyword
is an identifier, so neither name can clash with a user's object). They are restored only where a
replay asks for them (``checkpoints.restore_objects(training_state=True)``): loading a model from a
dataframe row must not reseed the caller's generators. Generators of modules the script never
imported are neither captured nor touched, and nothing here imports torch or numpy itself.
"""

from __future__ import annotations

import base64
import random
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CheckpointError
from .state import StateCopy, StateFormat, tree_matches

#: The checkpoint object holding every random generator's state.
RNG_NAME = "flor.rng"
#: Held by a checkpoint taken at an iteration's nested point when the iteration before it has no
#: checkpoint: the generators' states at that iteration's end, so that a validation replay can
#: check the state it arrives with (hindsight/_generators.py, issue 12.9) without a checkpoint there.
RNG_BEFORE_NAME = "flor.rng_before"
#: Held by a run's first checkpoint: the generators' states where its main loop started.
RNG_START_NAME = "flor.rng_start"
#: Suffix of the checkpoint object holding a module's parameter gradients.
GRAD_SUFFIX = ".grad"
#: Prefix of the checkpoint objects holding a written file's contents (then its project-relative path).
FILE_PREFIX = "flor.file:"
#: Files larger than this are not kept with checkpoints (a replay that needs one refuses to guess).
MAX_FILE_BYTES = 1 << 30


def is_training_state_name(name: str) -> bool:
    """True for the checkpoint objects this module adds (never a ``flor.checkpointing`` keyword)."""
    return name in (RNG_NAME, RNG_BEFORE_NAME, RNG_START_NAME) or name.endswith(GRAD_SUFFIX) or name.startswith(FILE_PREFIX)


def grad_name(name: str) -> str:
    """The checkpoint object holding the gradients of the module checkpointed as ``name``."""
    return name + GRAD_SUFFIX


# -- capture (training thread) ------------------------------------------------------------------


def capture(
    objects: Mapping[str, Any], files: Iterable[str] = (), root: Path | None = None,
    earlier: Mapping[str, RawRng] | None = None, reusable: Mapping[str, StateCopy] | None = None,
) -> list[tuple[str, StateCopy]]:
    """The generators' states, the gradients of ``objects``' torch modules and the current contents
    of ``files`` (paths relative to ``root`` the run wrote, written_files.py), as state copies;
    ``earlier`` generator states (:func:`raw_rng_state`) kept under their names
    (:data:`RNG_BEFORE_NAME`, :data:`RNG_START_NAME`) too. A gradients copy in ``reusable`` (the
    iteration's nested point) that still matches bit for bit is returned instead of a new one."""
    copies = [(RNG_NAME, StateCopy(StateFormat.JSON, rng_state(), 0))]
    for name, raw in (earlier or {}).items():
        copies.append((name, StateCopy(StateFormat.JSON, encode_rng_state(raw), 0)))
    for name, obj in objects.items():
        earlier_grads = (reusable or {}).get(grad_name(name))
        if earlier_grads is not None and tree_matches(_live_grads(obj), earlier_grads.payload):
            copies.append((grad_name(name), earlier_grads))
            continue
        grads = _grad_copy(obj)
        if grads is not None:
            copies.append((grad_name(name), grads))
    if root is not None:
        for relative in files:
            data = _read_file(root / relative)
            if data is not None:
                copies.append((FILE_PREFIX + relative, StateCopy(StateFormat.BYTES, data, len(data))))
    return copies


def _read_file(path: Path) -> bytes | None:
    # A file the run wrote and then removed, or replaced by a directory, is not state to restore;
    # one too large to copy at every checkpoint is left out (a replay that needs it fails visibly).
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_bytes()
    except OSError:
        return None


#: The generators' states as their modules return them (:func:`raw_rng_state`): a copy, not encoded.
RawRng = dict[str, Any]


def raw_rng_state() -> RawRng:
    """Every loaded generator's state as its module returns it: the cheap half of :func:`rng_state`
    (encoding is most of its cost), for a state that is kept only in case a checkpoint follows."""
    state: RawRng = {"python": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None and hasattr(np, "random"):
        state["numpy"] = np.random.get_state(legacy=True)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_rng_state"):
        state["torch"] = torch.get_rng_state()
        cuda = getattr(torch, "cuda", None)
        # Only generators already in use: asking for them would initialize CUDA in a CPU script.
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            state["cuda"] = cuda.get_rng_state_all()
    return state


def encode_rng_state(raw: RawRng) -> dict[str, Any]:
    """:func:`raw_rng_state`'s result as a JSON-plain object (what :func:`set_rng_state` takes)."""
    version, internal, gauss = raw["python"]
    state: dict[str, Any] = {"python": [version, list(internal), gauss]}
    if "numpy" in raw:
        name, keys, pos, has_gauss, cached = raw["numpy"]
        state["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    if "torch" in raw:
        state["torch"] = _b64(raw["torch"])
    if "cuda" in raw:
        state["cuda"] = [_b64(s) for s in raw["cuda"]]
    return state


def rng_state() -> dict[str, Any]:
    """Every loaded generator's state as a JSON-plain object."""
    return encode_rng_state(raw_rng_state())


#: How the generators of :func:`rng_state` are named to a user.
GENERATOR_NAMES = {"python": "Python's random", "numpy": "numpy's global generator",
                   "torch": "torch's CPU generator", "cuda": "torch's CUDA generators"}


def differing_generators(recorded: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """The keys of the generators (:data:`GENERATOR_NAMES`) whose states differ between two
    :func:`rng_state` objects, JSON-decoded or not; one that either lacks is not compared."""
    import json

    recorded, live = json.loads(json.dumps(recorded)), json.loads(json.dumps(live))  # tuples vs lists
    return [key for key in recorded if key in live and recorded[key] != live[key]]


def _b64(tensor: Any) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _live_grads(module: Any) -> dict[str, Any]:
    # the tree _grad_copy copies, uncopied: for comparing with an earlier copy
    return {pname: None if param.grad is None else param.grad for pname, param in module.named_parameters()}


def _grad_copy(obj: Any) -> StateCopy | None:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.nn.Module):
        return None
    grads: dict[str, Any] = {}
    nbytes = 0
    for pname, param in obj.named_parameters():
        if param.grad is None:
            grads[pname] = None
        else:
            grads[pname] = param.grad.detach().to("cpu", copy=True)
            nbytes += param.grad.numel() * param.grad.element_size()
    if not nbytes:
        return None  # no gradient yet (or a frozen model): nothing to restore
    return StateCopy(StateFormat.TORCH, grads, nbytes)


# -- restore (replay) ---------------------------------------------------------------------------


def restore(objects: Mapping[str, Any], loaded: Mapping[str, Any], files_root: Path | None = None) -> None:
    """Put the loaded generator states, gradients and (under ``files_root``) files back.

    :raises CheckpointError: a gradient does not fit its parameter (the model is built differently),
        or a file cannot be written inside ``files_root``.
    """
    if RNG_NAME in loaded:
        set_rng_state(loaded[RNG_NAME])
    for name, obj in objects.items():
        grads = loaded.get(grad_name(name))
        if grads is not None:
            _restore_grads(name, obj, grads)
    if files_root is not None:
        for name, data in loaded.items():
            if name.startswith(FILE_PREFIX):
                _write_file(files_root, name.removeprefix(FILE_PREFIX), data)


def _write_file(root: Path, relative: str, data: bytes) -> None:
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:  # written_files.py notes only paths under the root
        raise CheckpointError(f"a checkpointed file has a path outside the project: '{relative}'")
    target = root.joinpath(*path.parts)
    # The replay's tree may link directories of the user's (replay_links = ["data"]): writing through
    # such a link would change the user's files, which a replay never does.
    if not target.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(
            f"the run wrote '{relative}', which in the replay's directory leads outside it (through a link "
            "such as replay_links); it is not restored there, and this replay cannot have the file as recorded"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    except OSError as exc:
        raise CheckpointError(f"could not restore the file '{relative}' the run had written: {exc}") from exc


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Set every generator ``state`` holds whose module this process has loaded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch = sys.modules.get("torch")
    if torch is not None and "torch" in state:
        torch.set_rng_state(_tensor(torch, state["torch"]))
        # A run recorded on a GPU and replayed on a CPU has no CUDA generators to set, and a run
        # recorded on a CPU leaves a GPU replay's generators as they are (values differ anyway).
        if "cuda" in state and torch.cuda.is_available():
            devices = min(torch.cuda.device_count(), len(state["cuda"]))
            for device in range(devices):
                torch.cuda.set_rng_state(_tensor(torch, state["cuda"][device]), device)


def _tensor(torch: Any, text: str) -> Any:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _restore_grads(name: str, module: Any, grads: Mapping[str, Any]) -> None:
    import torch

    params = dict(module.named_parameters())
    missing = sorted(set(grads) - set(params))
    if missing:
        raise CheckpointError(
            f"the gradients checkpointed with '{name}' are of parameters it does not have ({', '.join(missing[:3])})"
        )
    with torch.no_grad():
        for pname, param in params.items():
            grad = grads.get(pname)
            if grad is None:
                param.grad = None
            elif param.grad is not None and param.grad.shape == grad.shape:
                param.grad.copy_(grad)
            else:
                param.grad = grad.to(device=param.device, dtype=param.dtype).clone()


def names_of(records: Iterable[str]) -> list[str]:
    """The user's objects among checkpoint object names (the training state this module adds left out)."""
    return [name for name in records if not is_training_state_name(name)]
