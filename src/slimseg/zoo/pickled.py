"""Tensors out of whole pickled models (``torch.save(model)``, e.g. SlimSAM's "global"
checkpoints) without importing or running anything the pickle names.

Only the few callables needed to describe tensors and containers are real; every other global
becomes an inert placeholder class that records what the pickle hands it. The placeholder graph
is then walked as ``nn.Module.state_dict()`` walks modules. ``torch.save(module)`` (protocol 2)
emits ``NEWOBJ`` + ``BUILD`` (state: the module's ``__dict__``) per module, and the globals
``collections.OrderedDict``, ``__builtin__.set``, ``torch._utils._rebuild_tensor_v2`` /
``_rebuild_parameter``, ``torch.<Type>Storage`` and the module classes (``torch.nn.modules.*``,
``torch.nn.parallel.data_parallel.DataParallel``, the model's own).
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from slimseg.errors import SlimsegError

StateDict = dict[str, torch.Tensor]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.]+$")
# Any of these escaping the unpickler or the tensor rebuild means a corrupt or hostile file.
_READ_ERRORS = (
    pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, KeyError, IndexError,
    RecursionError, OverflowError, MemoryError, RuntimeError, OSError, struct.error, zipfile.BadZipFile,
    zlib.error,
)


# Records are NamedTuples: immutable and without __dict__ or __setstate__, so a pickle BUILD
# cannot rewrite them after validation (a slotted dataclass would accept a __setstate__).
class _StorageType(NamedTuple):  # what a torch.<Type>Storage global resolves to; not callable
    dtype: torch.dtype


class _StorageRef(NamedTuple):
    key: str
    dtype: torch.dtype
    numel: int


class _TensorRecord(NamedTuple):  # a tensor as the pickle describes it, its bytes not yet read
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Placeholder:
    """Stand-in for a global not on the allowlist: absorbs everything, executes nothing."""

    pickled_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Placeholder":
        # cls is always one of our placeholder classes, so object.__new__ is safe; with __new__
        # overridden, object.__init__ accepts (and ignores) the same arguments.
        instance = object.__new__(cls)
        instance.pickled_args, instance.pickled_kwargs = args, kwargs
        instance.pickled_state, instance.pickled_items, instance.pickled_list = None, {}, []
        return instance

    def __call__(self, *args: Any, **kwargs: Any) -> "_Placeholder":
        return _placeholder_class(f"{self.pickled_global}()")(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.pickled_items[key] = value

    def append(self, value: Any) -> None:
        self.pickled_list.append(value)

    add = append  # APPENDS falls back to append; ADDITEMS (sets) uses add


@functools.lru_cache(maxsize=4096)
def _placeholder_class(qualified_name: str) -> type[_Placeholder]:
    return type(qualified_name, (_Placeholder,), {"pickled_global": qualified_name, "__module__": __name__})


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRecord:
    # requires_grad, backward hooks and metadata do not matter for a state dict.
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor without a storage record")
    return _TensorRecord(storage, _ints((offset,))[0], _ints(size), _ints(stride))


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    # A parameter is just its data here; hooks and extra attributes are dropped unexamined.
    return data


def _ints(values: Any) -> tuple[int, ...]:
    # Exact ints only: anything else (a placeholder, a float) means a forged tensor record.
    if not isinstance(values, (tuple, list)) or any(type(value) is not int for value in values):
        raise pickle.UnpicklingError("malformed tensor record (sizes, strides and offsets must be integers)")
    return tuple(values)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


# The pure-Python unpickler keeps its memo in a dict; the C one grows an array up to any index a
# (forged) LONG_BINPUT names, so a few bytes could demand gigabytes. data.pkl is small either way.
class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Resolves globals against :data:`_ALLOWED` only and storages to lazy references."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.class_names: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        self.class_names.add(qualified)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        return _placeholder_class(qualified)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:60]}")
        storage_type, key, _location, numel = pid[1:]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {getattr(storage_type, 'pickled_global', '?')}")
        if not (isinstance(key, str) and _STORAGE_KEY.match(key)):
            raise pickle.UnpicklingError("malformed storage key")
        return _StorageRef(key, storage_type.dtype, _ints((numel,))[0])


class _StorageReader:
    """Reads ``<archive>/data/<key>`` records on demand, one untyped storage per key, so that
    tensors sharing a storage in the file share it in memory too."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, prefix: str) -> None:
        self._path, self._archive, self._prefix = path, archive, prefix
        self._storages: dict[str, torch.UntypedStorage] = {}
        self._names = set(archive.namelist())

    def storage(self, ref: _StorageRef) -> torch.UntypedStorage:
        if ref.key in self._storages:
            return self._storages[ref.key]
        name = f"{self._prefix}data/{ref.key}"
        if name not in self._names:
            raise SlimsegError(f"{self._path}: corrupt checkpoint (missing storage record {name})")
        size = ref.numel * ref.dtype.itemsize
        # Checked before allocating, so a forged element count cannot ask for a huge buffer.
        if self._archive.getinfo(name).file_size != size:
            raise SlimsegError(f"{self._path}: corrupt checkpoint (storage record {name} has the wrong size)")
        buffer = bytearray(size)
        with self._archive.open(name) as handle:
            if handle.readinto(buffer) != len(buffer):
                raise SlimsegError(f"{self._path}: corrupt checkpoint (storage record {name} is short)")
        storage = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage() if buffer else torch.UntypedStorage(0)
        self._storages[ref.key] = storage
        return storage

    def tensor(self, record: _TensorRecord) -> torch.Tensor:
        tensor = torch.empty(0, dtype=record.storage.dtype)
        return tensor.set_(self.storage(record.storage), record.offset, record.size, record.stride)


@dataclass(frozen=True)
class PickledCheckpoint:
    """Tensors of a pickled model and every ``"module.name"`` global its pickle refers to
    (e.g. ``"segment_anything_kd.modeling.sam.Sam"``, which marks a SlimSAM pickle)."""

    state_dict: StateDict
    class_names: frozenset[str]
    whole_model: bool = False  # tensors came from a pickled nn.Module, not from a state dict


def _is_module(obj: Any) -> bool:
    state = obj.pickled_state if isinstance(obj, _Placeholder) else None
    return isinstance(state, dict) and isinstance(state.get("_parameters"), dict) and "_modules" in state


def _collect_module(obj: _Placeholder, prefix: str, found: dict[str, _TensorRecord], path: set[int]) -> None:
    """``nn.Module.state_dict()`` over placeholders: parameters, persistent buffers, children."""
    state = obj.pickled_state
    buffers, children = state.get("_buffers") or {}, state.get("_modules") or {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    if id(obj) in path or not (isinstance(buffers, dict) and isinstance(children, dict)):
        raise pickle.UnpicklingError(f"malformed module {prefix or 'at the root'}")
    if not isinstance(non_persistent, (set, frozenset)):
        raise pickle.UnpicklingError(f"malformed non-persistent buffer set in {prefix or 'the root'}")
    named = [*state["_parameters"].items(), *((n, v) for n, v in buffers.items() if n not in non_persistent)]
    for name, value in named:
        if value is not None and not isinstance(value, _TensorRecord):
            raise pickle.UnpicklingError(f"{prefix}{name} is not a plain dense tensor")
        if value is not None:
            found[f"{prefix}{name}"] = value
    for name, child in children.items():
        if child is not None and not _is_module(child):
            raise pickle.UnpicklingError(f"{prefix}{name} is not a module")
        if child is not None:
            _collect_module(child, f"{prefix}{name}.", found, path | {id(obj)})


# Where training scripts keep the weights beside optimizer state, epochs and arguments
# (which may be any object: they come back as placeholders and are ignored).
_NESTED_STATE_KEYS = ("model", "state_dict", "model_state_dict", "module", "net")
_MAX_NESTING = 3


def _tensor_records(root: Any, depth: int = 0) -> tuple[dict[str, _TensorRecord], bool]:
    """The tensors of a state dict or module at ``root`` or under one of the usual keys of a
    training checkpoint, and whether they came from a module."""
    if isinstance(root, dict) and root and all(isinstance(v, _TensorRecord) for v in root.values()):
        return {str(key): value for key, value in root.items()}, False
    if _is_module(root):
        found: dict[str, _TensorRecord] = {}
        _collect_module(root, "", found, set())
        return found, True
    if isinstance(root, dict) and depth < _MAX_NESTING:
        for key in _NESTED_STATE_KEYS:
            if key in root and (nested := _tensor_records(root[key], depth + 1))[0]:
                return nested
    return {}, False


def _data_pickle_name(path: Path, archive: zipfile.ZipFile) -> str:
    names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise SlimsegError(f"{path}: not a torch checkpoint archive (expected one */data.pkl, found {len(names)})")
    byteorder = names[0][: -len("data.pkl")] + "byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"", sys.byteorder.encode()):
        raise SlimsegError(f"{path}: checkpoint was saved with a different byte order, which slimseg cannot read")
    return names[0]


def _read(path: str | Path, with_tensors: bool) -> PickledCheckpoint:
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise SlimsegError(f"{path}: not a torch zip checkpoint (legacy or raw pickles are refused)")
    state: StateDict = {}
    whole_model = False
    try:
        with zipfile.ZipFile(path) as archive:
            name = _data_pickle_name(path, archive)
            unpickler = _RestrictedUnpickler(archive.read(name))
            root = unpickler.load()
            if with_tensors:
                records, whole_model = _tensor_records(root)
                if not records:
                    raise SlimsegError(f"{path}: holds no model tensors")
                reader = _StorageReader(path, archive, name[: -len("data.pkl")])
                state = {key: reader.tensor(record) for key, record in records.items()}
    except _READ_ERRORS as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise SlimsegError(f"{path}: corrupt or unsupported checkpoint ({reason})") from None
    return PickledCheckpoint(state, frozenset(unpickler.class_names), whole_model)


def read_pickled_checkpoint(path: str | Path) -> PickledCheckpoint:
    """Tensors of a ``torch.save``'d module (or state dict), keyed as ``state_dict()`` keys them
    (wrappers included, see :func:`strip_data_parallel`), plus the globals the pickle names.

    Legacy (non-zip) torch files, corrupt or truncated archives, missing storage records and
    files without module tensors raise a one-line :class:`SlimsegError` naming ``path``."""
    return _read(path, with_tensors=True)


def read_pickled_module_state(path: str | Path) -> StateDict:
    """The flat state dict of a pickled module; see :func:`read_pickled_checkpoint`."""
    return _read(path, with_tensors=True).state_dict


def pickled_class_names(path: str | Path) -> set[str]:
    """Every ``"module.name"`` global the pickle in ``path`` names; reads no tensor data."""
    return set(_read(path, with_tensors=False).class_names)


def strip_data_parallel(state: StateDict) -> StateDict:
    """Drop the ``module.`` level that ``DataParallel`` adds: ``image_encoder.module.X`` becomes
    ``image_encoder.X`` (and ``module.X`` becomes ``X`` for a wrapped whole model).

    A top-level name is unwrapped only when every key under it has the ``module.`` level, so a
    genuine submodule called ``module`` beside other children is left alone.
    """
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    tops = {key.split(".", 1)[0] for key in state}
    wrapped = {top for top in tops if all(k.startswith(f"{top}.module.") for k in state if k.split(".", 1)[0] == top)}
    return {
        key.replace(".module.", ".", 1) if key.split(".", 1)[0] in wrapped else key: value
        for key, value in state.items()
    }
