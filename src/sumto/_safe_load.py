"""Read a ``torch.save`` checkpoint without running code from it or letting it claim memory.

``torch.load(weights_only=True)`` runs no arbitrary code, but it calls the functions of its
allow-list with whatever arguments the pickle holds, and some of them allocate from numbers
in the file: ``bytearray(n)`` fills ``n`` bytes, ``_codecs.encode`` chained with the ``hex``
codec doubles a buffer per call, and a tensor header may declare a huge shape with stride 0
over a 4-byte storage, which costs nothing to load and gigabytes to compute with. A 2 KB
file can ask for any of these, so checking the loaded objects comes too late. Memory is
bounded here before anything is built:

1. The zip archive is read with :mod:`zipfile`: every record must be stored uncompressed,
   once, inside the file, so no record torch reads can be larger than the file.
2. ``data.pkl`` is replayed by :class:`_DryRun`, an interpreter for the opcodes of torch's
   weights-only unpickler that builds no object: a call is an allow-listed name whose
   arguments must pass the rule for that name. A tensor must lie inside its storage record
   and hold no more bytes than the file (this refuses stride-0 headers of huge shape);
   bytes come only from ``latin1`` strings of the pickle; numpy values only in the form
   numpy writes, where numpy checks the data length before it allocates.
3. Only then ``torch.load(weights_only=True, mmap=True)`` runs the same opcodes with the same
   extra allow-list: every storage is a view of the mapped file, so loading copies no tensor
   data, and any computation on a tensor costs a multiple of the file size at most.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import pathlib
import reprlib
import struct
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["UntrustedContentError", "load_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save before torch 1.6
_ORDERED = "collections.OrderedDict"
_BYTES = "_codecs.encode"  # how protocol 2 writes bytes: encode(str, "latin1")
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1, numpy 2
_PATHS = ("PosixPath", "PurePosixPath", "PureWindowsPath")


class UntrustedContentError(ValueError):
    """The file holds something only the full pickle loader (``weights_only=False``) reads."""


class _Node:
    """Stands for the object that the call of an allow-listed name will build."""

    __slots__ = ("kind", "storage")

    def __init__(self, kind: str, storage: tuple[torch.dtype, int] | None = None) -> None:
        self.kind = kind
        self.storage = storage  # a storage's (dtype, nbytes)

    def __repr__(self) -> str:
        return f"<{self.kind}>"


class _Global:
    """A GLOBAL opcode: the name only, resolved to nothing."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _is(value: Any, kind: str) -> bool:
    return isinstance(value, _Node) and value.kind == kind


def _ints(value: Any) -> bool:
    return type(value) in (tuple, list) and all(type(v) is int and v >= 0 for v in value)


def _strs(args: tuple[Any, ...]) -> bool:
    return all(type(a) is str for a in args)


def _latin1(args: tuple[Any, ...]) -> bool:
    """``(text, "latin1")``: one byte per character of a string of the pickle."""
    return len(args) == 2 and _strs(args) and args[1] in ("latin1", "latin-1")


def _torch_dtype(name: str) -> torch.dtype | None:
    module, _, attr = name.rpartition(".")
    value = getattr(torch, attr, None) if module == "torch" else None
    return value if isinstance(value, torch.dtype) else None


def _storage_dtype(name: str) -> torch.dtype | None:
    if name == "torch.storage.UntypedStorage":
        return torch.uint8
    module, _, attr = name.rpartition(".")
    if module != "torch" or not attr.endswith("Storage") or attr == "TypedStorage":
        return None
    dtype = getattr(getattr(torch, attr, None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _rules() -> dict[str, Callable[[tuple[Any, ...]], bool]]:
    """Allowed calls: name -> accepts these arguments (tensors are checked by _DryRun)."""
    rules: dict[str, Callable[[tuple[Any, ...]], bool]] = {
        _ORDERED: lambda a: a == (),
        "collections.Counter": lambda a: a == () or (len(a) == 1 and type(a[0]) is dict),
        "builtins.set": lambda a: len(a) == 1 and type(a[0]) is list,
        "builtins.complex": lambda a: 1 <= len(a) <= 2 and all(type(v) is float for v in a),
        "builtins.bytearray": lambda a: _latin1(a) or (len(a) == 1 and _is(a[0], _BYTES)),
        _BYTES: _latin1,
        "torch.Size": lambda a: len(a) == 1 and _ints(a[0]),
        "torch.device": lambda a: 1 <= len(a) <= 2 and _strs(a[:1]) and _ints(a[1:]),
        "argparse.Namespace": lambda a: a == (),
        # numpy.dtype(str, align=False, copy=True): a new descriptor, never a shared one
        "numpy.dtype": lambda a: len(a) == 3 and _strs(a[:1]) and a[1:] == (False, True),
    }
    for name in _PATHS:
        for module in ("pathlib", "pathlib._local"):  # pathlib._local: Python >= 3.13
            rules[f"{module}.{name}"] = _strs
    for module in _NUMPY_CORE:
        # scalar(dtype, data) checks len(data) >= itemsize; without data it fills itemsize
        rules[f"{module}.scalar"] = lambda a: (
            len(a) == 2 and _is(a[0], "numpy.dtype") and _is(a[1], _BYTES)
        )
        # _reconstruct(ndarray, (0,), b"b"): an empty array; BUILD then sets shape and data
        rules[f"{module}._reconstruct"] = lambda a: (
            (len(a) == 3 and isinstance(a[0], _Global) and a[0].name == "numpy.ndarray")
            and (a[1] == (0,) and _is(a[2], _BYTES))
        )
    return rules


# The real objects behind the extra names, for torch.load's own allow-list.
def _extra_globals() -> list[Any]:
    extras: list[Any] = [argparse.Namespace]
    for name in _PATHS:
        cls = getattr(pathlib, name)
        extras += [(cls, f"pathlib.{name}"), (cls, f"pathlib._local.{name}")]
    try:
        import numpy as np
    except ImportError:
        return extras
    try:
        core = importlib.import_module(_NUMPY_CORE[1])
    except ImportError:  # numpy 1
        core = importlib.import_module(_NUMPY_CORE[0])
    for module in _NUMPY_CORE:
        extras += [(core.scalar, f"{module}.scalar"), (core._reconstruct, f"{module}._reconstruct")]
    # torch's BUILD checks type(obj): dtypes are instances of per-type classes such as Float64DType
    dtype_classes = [c for c in vars(getattr(np, "dtypes", np)).values() if isinstance(c, type)]
    extras += [np.dtype, np.ndarray, *(c for c in dtype_classes if issubclass(c, np.dtype))]
    return extras


class _DryRun:
    """Replays ``data.pkl`` opcode by opcode as torch's weights-only unpickler would.

    Args:
        data: The bytes of ``data.pkl``.
        records: Storage key -> size in bytes of its ``data/<key>`` record.
        limit: The file size: no tensor may hold more bytes.
    """

    def __init__(self, data: bytes, records: dict[str, int], limit: int) -> None:
        self.file = io.BytesIO(data)
        self.records = records
        self.limit = limit
        self.rules = _rules()
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.storages: dict[str, _Node] = {}
        fixed: dict[bytes, Callable[[], Any]] = {
            b"N": lambda: None,
            b"\x88": lambda: True,
            b"\x89": lambda: False,
            b")": tuple,
            b"]": list,
            b"}": dict,
            b"\x8f": set,
            b"K": lambda: self.read(1)[0],
            b"M": lambda: self.unpack("<H"),
            b"J": lambda: self.unpack("<i"),
            b"G": lambda: self.unpack(">d"),
            b"\x8a": lambda: int.from_bytes(self.read(self.read(1)[0]), "little", signed=True),
            b"X": lambda: str(self.read(self.unpack("<I")), "utf-8", "surrogatepass"),
            b"U": lambda: self.read(self.read(1)[0]).decode("utf-8"),  # torch.load: utf-8
            b"h": lambda: self.memo[self.read(1)[0]],
            b"j": lambda: self.memo[self.unpack("<I")],
            b"c": self.global_,
            b"Q": lambda: self.storage(self.stack.pop()),
            b"\x81": self.newobj,
        }
        self.ops: dict[bytes, Callable[[], None]] = {
            op: self.push(make) for op, make in fixed.items()
        }
        self.ops.update(
            {
                b"\x80": self.proto,
                b"R": self.reduce,
                b"b": self.build,
                b"(": self.mark,
                b"t": self.tuple_mark,
                b"\x85": lambda: self.tuple_of(1),
                b"\x86": lambda: self.tuple_of(2),
                b"\x87": lambda: self.tuple_of(3),
                b"a": lambda: self.extend([self.stack.pop()]),
                b"e": lambda: self.extend(self.pop_mark()),
                b"s": lambda: self.set_items([self.stack.pop(-2), self.stack.pop()]),
                b"u": lambda: self.set_items(self.pop_mark()),
                b"q": lambda: self.memo.__setitem__(self.read(1)[0], self.stack[-1]),
                b"r": lambda: self.memo.__setitem__(self.unpack("<I"), self.stack[-1]),
            }
        )

    def push(self, make: Callable[[], Any]) -> Callable[[], None]:
        return lambda: self.stack.append(make())

    def proto(self) -> None:
        self.read(1)

    def read(self, count: int) -> bytes:
        data = self.file.read(count)
        if len(data) != count:
            raise ValueError("expected a complete data.pkl, got a truncated one")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def run(self) -> None:
        """Replay up to STOP; ValueError (UntrustedContentError for a name) if refused."""
        try:
            while (op := self.read(1)) != b".":
                if op not in self.ops:
                    raise ValueError(f"expected an opcode torch.load accepts, got {op!r}")
                self.ops[op]()
        except (IndexError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
            raise ValueError(f"expected a well-formed data.pkl, got {type(exc).__name__}") from exc

    # -- the opcodes that reach names ------------------------------------------------------

    def global_(self) -> _Global:
        module = self.file.readline()[:-1].decode("utf-8")
        name = self.file.readline()[:-1].decode("utf-8")
        if (module, name) in NAME_MAPPING:  # Python 2 names, as torch.load maps them
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        known = full in self.rules or full in _TENSOR_CALLS or full == "numpy.ndarray"
        if not (known or _torch_dtype(full) or _storage_dtype(full)):
            raise UntrustedContentError(
                "expected dense tensors, containers, numbers, strings, argparse.Namespace, "
                f"numpy or pathlib values, got a reference to {full!r}"
            )
        return _Global(full)

    def call(self, func: Any, args: Any) -> _Node:
        if not isinstance(func, _Global) or type(args) is not tuple:
            raise ValueError(f"expected a call of an allowed name, got {reprlib.repr(func)}")
        if func.name in _TENSOR_CALLS:
            return self.tensor(func.name, args)
        if func.name == "numpy.dtype" and args and type(args[0]) is str and "O" in args[0]:
            raise UntrustedContentError(
                "expected numpy dtypes of numbers, strings or dates, got an object dtype"
            )
        rule = self.rules.get(func.name)
        if rule is None or not rule(args):
            raise ValueError(
                f"expected {func.name} called as torch.save writes it, got {reprlib.repr(args)}"
            )
        return _Node(func.name)

    def reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args)

    def newobj(self) -> _Node:
        args, cls = self.stack.pop(), self.stack.pop()
        if not (
            isinstance(cls, _Global) and cls.name in ("argparse.Namespace", "builtins.complex")
        ):
            raise ValueError(
                f"expected NEWOBJ of argparse.Namespace or complex, got {reprlib.repr(cls)}"
            )
        return self.call(cls, args)

    def storage(self, pid: Any) -> _Node:
        """BINPERSID: ('storage', storage type, key, location, numel), as torch.save writes."""
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise ValueError(f"expected a storage id, got {reprlib.repr(pid)}")
        _, storage_type, key, location, numel = pid
        if key in self.storages:  # torch.load keeps the first storage of a key
            return self.storages[key]
        dtype = _storage_dtype(storage_type.name) if isinstance(storage_type, _Global) else None
        if dtype is None or type(location) is not str or type(numel) is not int:
            raise ValueError(f"expected a storage id, got {reprlib.repr(pid)}")
        if self.records.get(key) != numel * dtype.itemsize:
            raise ValueError(
                f"expected a record data/{key} of {numel * dtype.itemsize} bytes, got "
                f"{'none' if key not in self.records else f'{self.records[key]} bytes'}"
            )
        self.storages[key] = _Node("storage", (dtype, numel * dtype.itemsize))
        return self.storages[key]

    def tensor(self, name: str, args: tuple[Any, ...]) -> _Node:
        """A tensor rebuilt as a view of its storage: it must fit it, and the file."""
        if name == "torch._utils._rebuild_parameter":
            ok = len(args) == 3 and _is(args[0], "tensor") and type(args[1]) is bool
            if not (ok and _is(args[2], _ORDERED)):
                raise ValueError(f"expected a parameter header, got {reprlib.repr(args)}")
            return _Node("tensor")
        count, dtype_at = _TENSOR_CALLS[name]
        header = args[:4]
        ok = count <= len(args) <= count + (count > 4) and _is(args[0], "storage")
        dtype = args[0].storage[0] if ok else None
        if ok and dtype_at is not None:
            dtype = (
                _torch_dtype(args[dtype_at].name) if isinstance(args[dtype_at], _Global) else None
            )
        if ok and count > 4:  # requires_grad, backward_hooks (saved empty), [metadata]
            ok = type(args[4]) is bool and _is(args[5], _ORDERED)
            ok = ok and (len(args) == count or args[count] is None or type(args[count]) is dict)
        _, offset, size, stride = header if ok else (None, None, None, None)
        ok = ok and dtype is not None and type(offset) is int and offset >= 0
        if not (ok and _ints(size) and _ints(stride) and len(size) == len(stride)):
            raise ValueError(f"expected a tensor header, got {reprlib.repr(args)}")
        assert isinstance(dtype, torch.dtype) and isinstance(offset, int)  # for mypy
        numel, nbytes = math.prod(size), args[0].storage[1]
        if numel * dtype.itemsize > self.limit:
            raise ValueError(
                f"expected every tensor to fit in the file ({self.limit} bytes), got shape "
                f"{tuple(size)} with strides {tuple(stride)}: {numel * dtype.itemsize} bytes"
            )
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if numel > 0 and (last + 1) * dtype.itemsize > nbytes:
            raise ValueError(
                f"expected every tensor inside its storage ({nbytes} bytes), got shape "
                f"{tuple(size)}, strides {tuple(stride)} and offset {offset}"
            )
        return _Node("tensor")

    def build(self) -> None:
        """BUILD: set the state of an OrderedDict, a Namespace or a numpy dtype or array."""
        state = self.stack.pop()
        inst = self.stack[-1]
        kind = inst.kind if isinstance(inst, _Node) else type(inst).__name__
        if kind in (_ORDERED, "argparse.Namespace"):
            ok = type(state) is dict
        elif kind == "numpy.dtype":
            # (version, order, subarray, names, fields, size, alignment, flags[, metadata])
            ok = type(state) is tuple and len(state) in (8, 9)
            ok = ok and all(type(v) is int for v in state[5:8])
            # numpy reads the items of an object dtype as pointers: numbers, strings, dates only
            if ok and (state[2:5] != (None,) * 3 or state[7] & 0b111):  # refcount, list, pointer
                raise UntrustedContentError(
                    "expected numpy dtypes of numbers, strings or dates, got a structured or "
                    "object dtype"
                )
        elif kind.endswith("._reconstruct"):  # ndarray: (version, shape, dtype, fortran, data)
            ok = type(state) is tuple and len(state) == 5 and _ints(state[1])
            ok = ok and _is(state[2], "numpy.dtype")
            ok = ok and _is(state[4], _BYTES)
        else:
            ok = False
        if not ok:
            raise ValueError(f"expected object state as torch.save writes it, got {kind}")

    # -- containers ------------------------------------------------------------------------

    def mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def tuple_mark(self) -> None:
        items = self.pop_mark()  # switches self.stack back to the outer stack first
        self.stack.append(tuple(items))

    def tuple_of(self, count: int) -> None:
        if len(self.stack) < count:
            raise IndexError("stack underflow")
        self.stack[len(self.stack) - count :] = [tuple(self.stack[len(self.stack) - count :])]

    def extend(self, items: list[Any]) -> None:
        if type(self.stack[-1]) is not list:
            raise TypeError("APPEND on something else than a list")
        self.stack[-1].extend(items)

    def set_items(self, items: list[Any]) -> None:
        target = self.stack[-1]
        if type(target) is not dict:  # the real load fills these; their items need no check
            if not (_is(target, _ORDERED) or _is(target, "collections.Counter")):
                raise TypeError("SETITEM on something else than a dict")
            target = {}
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]


# name -> (number of arguments without the optional metadata, index of the dtype argument)
_TENSOR_CALLS: dict[str, tuple[int, int | None]] = {
    "torch._utils._rebuild_tensor": (4, None),
    "torch._utils._rebuild_tensor_v2": (6, None),
    "torch._utils._rebuild_tensor_v3": (7, 6),
    "torch._utils._rebuild_parameter": (3, None),
}


def _check_archive(path: Path) -> None:
    """Check the zip records and replay data.pkl; ValueError if the file is refused."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(len(_LEGACY_MAGIC))
    if not head:
        raise ValueError("expected a checkpoint written by torch.save, got an empty file")
    if head == _LEGACY_MAGIC:
        raise UntrustedContentError(
            "expected a zip checkpoint (torch.save's format since torch 1.6), got the "
            "legacy format, which only the full pickle loader reads"
        )
    if not head.startswith(_ZIP_MAGIC):
        raise ValueError(
            "expected a checkpoint written by torch.save (a zip archive), got a file "
            f"starting with {head[:8]!r}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            prefix = names[0].split("/")[0] + "/" if names and "/" in names[0] else ""
            for info in infos:  # before reading any record: no inflating, nothing past the end
                inside = info.header_offset + info.compress_size <= size
                stored = info.compress_type == zipfile.ZIP_STORED
                stored = stored and info.compress_size == info.file_size and not info.flag_bits & 1
                if not (stored and inside and info.filename.startswith(prefix)):
                    raise ValueError(
                        "expected uncompressed records inside the file, as torch.save writes "
                        f"them, got record {info.filename!r}"
                    )
            if prefix + "data.pkl" not in names or len(set(names)) != len(names):
                raise ValueError(
                    "expected a torch.save archive (one data.pkl, no duplicate records), "
                    f"got records {names[:4]}"
                )
            if infos[0].header_offset != 0:  # torch's zip reader does not skip a prefix
                raise ValueError("expected a torch.save archive, got data before its records")
            data = archive.read(prefix + "data.pkl")
    except ValueError:
        raise
    except Exception as exc:  # zipfile raises many types on damaged archives
        raise ValueError(
            f"expected a readable zip archive, got {type(exc).__name__}: {exc}"
        ) from exc
    storage_prefix = prefix + "data/"
    records = {
        info.filename[len(storage_prefix) :]: info.file_size
        for info in infos
        if info.filename.startswith(storage_prefix)
    }
    _DryRun(data, records, size).run()


def _torch_failure(exc: Exception) -> str:
    """The informative part of a ``torch.load`` error, as one short sentence."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:  # weights_only errors bury the reason after a long preamble
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0].split(". ")[0].rstrip(".") if lines else "empty or truncated file"
    return f"{type(exc).__name__}: {reason}"


def load_checkpoint(path: str | Path, *, trusted: bool = False) -> Any:
    """Load what ``torch.save`` wrote to ``path``, on the CPU.

    By default the file is checked and loaded without running code from it, within a
    memory bound of a multiple of its size (see the module docstring). It may hold tensors,
    dicts, lists, tuples, sets, numbers, strings, bytes, ``torch.Size``, ``torch.device``,
    ``argparse.Namespace``, numpy scalars, dtypes and arrays, and pathlib paths.

    Args:
        path: A checkpoint written by ``torch.save``.
        trusted: Load with the full pickle loader (``weights_only=False``) instead, which
            executes arbitrary code from the file and bounds nothing: only for files you trust.

    Returns:
        The loaded object.

    Raises:
        UntrustedContentError: The file holds objects that only ``trusted`` loading reads.
        ValueError: The file is damaged or hostile, or ``torch.load`` failed on it.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save({"w": torch.ones(2)}, f"{folder}/w.pt")
        ...     load_checkpoint(f"{folder}/w.pt")
        {'w': tensor([1., 1.])}
    """
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. TypedStorage and pickle-protocol notices
        return _load(path, trusted)


def _load(path: Path, trusted: bool) -> Any:
    if not trusted:
        _check_archive(path)
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    allow = safe_globals(_extra_globals()) if safe_globals and not trusted else None
    try:
        with allow or contextlib.nullcontext():
            if trusted:
                return torch.load(path, map_location="cpu", weights_only=False)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"expected a file torch.load reads, got {_torch_failure(exc)}") from exc
