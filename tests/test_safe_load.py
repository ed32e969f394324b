"""sumto._safe_load: the default loader of ``sumto inspect`` on hostile and ordinary checkpoints.

A checkpoint is read without running code from it: files that ask for allocations,
classes or layouts the loader does not trust are refused in one line before anything
is built, and ordinary training checkpoints load intact.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sumto
from reference import inspected_model, run_inspect
from sumto.cli import main

# ---------------------------------------------------------------------------
# hostile files, and ordinary training checkpoints
# ---------------------------------------------------------------------------


def _replace_pickle(path: Path, pickled: bytes, compression: int = zipfile.ZIP_STORED) -> None:
    """Rewrite the torch.save archive at ``path`` with another data.pkl."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in records:
            archive.writestr(name, pickled if name.endswith("/data.pkl") else data)


def _limit_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux")
def test_inspect_refuses_a_huge_stride_0_tensor_in_a_small_file(tmp_path: Path):
    # A 6 GiB float64 tensor header over an 8-byte storage: loading it costs nothing,
    # computing a sum of it costs 6 GiB; inspect must refuse it before either.
    state = nn.Sequential(sumto.simplex(nn.Linear(3, 2))).state_dict()
    huge = torch.zeros(1, 1, dtype=torch.float64).expand(3, 2**28)
    state["0.parametrizations.weight.original"] = huge
    path = tmp_path / "hostile.pt"
    torch.save(state, path)
    assert path.stat().st_size < 4096
    # one thread and two malloc arenas: the 2 GiB cap then measures the file's demands,
    # not the address space reserved per thread
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "sumto", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        preexec_fn=_limit_address_space,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("sumto inspect: error: expected every tensor to fit in")
    assert "(3, 268435456)" in result.stderr and "(0, 0)" in result.stderr


_HEX_LEVELS = 10  # encode(encode(...(b"abcd", "latin1")..., "hex"), "hex"): 4 * 2**9 bytes


@pytest.mark.parametrize(
    ("gadget", "named"),
    [
        # {"x": bytearray(2**20)}: torch's weights-only allow-list zero-fills any size
        (b"c__builtin__\nbytearray\nJ\x00\x00\x10\x00\x85R", "builtins.bytearray"),
        # each hex level doubles the buffer: 30 levels of a 1 KB file ask for 4 GiB
        (
            b"c_codecs\nencode\nq\x00"
            + b"h\x00" * (_HEX_LEVELS - 1)
            + b"X\x04\x00\x00\x00abcdX\x06\x00\x00\x00latin1\x86R"
            + b"X\x03\x00\x00\x00hex\x86R" * (_HEX_LEVELS - 1),
            "_codecs.encode",
        ),
    ],
    ids=["bytearray", "hex-chain"],
)
def test_inspect_refuses_allocating_calls_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gadget: bytes, named: str
):
    path = tmp_path / "gadget.pt"
    torch.save({"x": torch.zeros(1)}, path)
    _replace_pickle(path, b"\x80\x02}X\x01\x00\x00\x00x" + gadget + b"s.")
    status, out, err = run_inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"sumto inspect: error: expected {named}")
    assert "--trusted" not in err  # a hostile file gets no invitation to run it


class _Pid:
    """A persistent id in a crafted pickle, as torch.save writes for a storage."""

    def __init__(self, numel: int) -> None:
        self.pid = ("storage", torch.FloatStorage, "0", "cpu", numel)


class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _pickled(obj: Any) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, value: Any) -> Any:
            return value.pid if isinstance(value, _Pid) else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _header(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """{"x": a float tensor header over storage "0"}, to replace the data.pkl of a save."""
    rebuild = torch._utils._rebuild_tensor_v2
    hooks = collections.OrderedDict()  # type: ignore[var-annotated]
    return _pickled({"x": _Reduce(rebuild, _Pid(numel), 0, size, stride, False, hooks)})


@pytest.mark.parametrize(
    ("pickled", "compress", "reason"),
    [
        (_header(1, (2**20,), (0,)), False, "expected every tensor to fit in the file"),
        (_header(1000, (1000,), (1,)), False, "expected a record data/0 of 4000 bytes, got 4"),
        (_header(1, (2,), (1,)), False, "expected every tensor inside its storage (4 bytes)"),
        (_header(1, (1,), (1,)), True, "expected uncompressed records"),
        (pickle.dumps({"x": 1}, protocol=4), False, "expected an opcode torch.load accepts"),
        (b"\x80\x02" + b"(" * 10**5 + b"t" * 10**5 + b"\x85}\x8f\x86R.", False, "(((((("),
    ],
    ids=["stride-0", "storage-size", "beyond-storage", "compressed", "protocol-4", "nesting"],
)
def test_inspect_of_a_crafted_archive_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pickled: bytes, compress: bool, reason: str
):
    path = tmp_path / "crafted.pt"
    torch.save({"x": torch.zeros(1)}, path)
    _replace_pickle(path, pickled, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
    status, out, err = run_inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sumto inspect: error: expected")
    assert reason in err


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_inspect_of_a_truncated_checkpoint_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: float
):
    path = tmp_path / "cut.pt"
    torch.save(inspected_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    status, out, err = run_inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sumto inspect: error: expected")


def test_inspect_reads_a_training_checkpoint_with_namespace_and_numpy_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    np = pytest.importorskip("numpy")
    model = inspected_model()
    checkpoint = {
        "state_dict": model.state_dict(),
        "args": argparse.Namespace(lr=0.1),
        "step": np.int64(3),
    }
    torch.save(checkpoint, tmp_path / "train.pt")
    status, out, err = run_inspect(tmp_path / "train.pt", capsys)
    assert status == 0 and err == ""
    assert "4 sumto-constrained tensors" in out
    assert "state_dict/0.weight: shape (3, 5)" in out and "Simplex(" in out
    assert out.count("within the rounding tolerance") == 4


def test_the_default_loader_returns_common_checkpoint_values_intact(tmp_path: Path):
    from sumto._safe_load import load_checkpoint

    np = pytest.importorskip("numpy")
    model = inspected_model()
    adam = {  # Adam.state_dict() after a step, without paying for the step
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(3, 5)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "amsgrad": False, "params": [0]}],
    }
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": adam,
        "args": argparse.Namespace(out=Path("runs/a"), tags={"a", "b"}, betas=(0.9, 0.99)),
        "numpy": [np.float64(0.5), np.bool_(True), np.dtype("f4"), np.arange(6.0).reshape(2, 3)],
        "rng": (np.random.get_state(), torch.get_rng_state()),
        "misc": [torch.Size([2, 3]), collections.Counter("aab"), 1 + 2j, b"\x00\xff", 2**100],
        "dtypes": [torch.zeros(2, dtype=d) for d in (torch.uint16, torch.bfloat16, torch.bool)],
        "views": [torch.arange(10.0)[2:8:2], torch.arange(6.0).view(2, 3).t(), torch.tensor(3.0)],
    }
    torch.save(checkpoint, tmp_path / "full.pt")
    loaded = load_checkpoint(tmp_path / "full.pt")
    expected = torch.load(tmp_path / "full.pt", weights_only=False)  # our own file
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert repr(loaded[key]) == repr(expected[key]), key


class _Opaque:
    """A class no allow-list knows."""

    def __init__(self) -> None:
        self.value = 7


def test_inspect_names_trusted_for_other_classes_and_reads_them_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "opaque.pt"
    torch.save({"state_dict": inspected_model().state_dict(), "extra": _Opaque()}, path)
    status, out, err = run_inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and "--trusted" in err and "_Opaque'" in err
    assert main(["inspect", "--trusted", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "4 sumto-constrained tensors" in captured.out


def test_inspect_names_trusted_for_legacy_files_and_reads_them_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "legacy.pt"
    torch.save(inspected_model().state_dict(), path, _use_new_zipfile_serialization=False)
    status, _, err = run_inspect(path, capsys)
    assert status == 1 and err.count("\n") == 1
    assert "legacy format" in err and "--trusted" in err
    assert main(["inspect", "--trusted", str(path)]) == 0
    assert "4 sumto-constrained tensors" in capsys.readouterr().out


class _Exploding(dict):  # type: ignore[type-arg]
    """Constraint state that fails in an unforeseen way when read."""

    def get(self, *args: Any) -> Any:
        raise RuntimeError("boom")


def test_inspect_of_an_undescribable_file_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    state = nn.Sequential(sumto.simplex(nn.Linear(3, 2))).state_dict()
    state["0.parametrizations.weight.original"] = torch.empty(2, 3, device="meta")
    torch.save(state, tmp_path / "meta.pt")
    status, _, err = run_inspect(tmp_path / "meta.pt", capsys)  # no data: refused by default
    assert status == 1 and err.count("\n") == 1 and "--trusted" in err
    state = nn.Sequential(sumto.simplex(nn.Linear(3, 2))).state_dict()
    state._metadata["0"]["sumto.constraints"]["parametrizations.weight.0"] = _Exploding()  # type: ignore[attr-defined]
    torch.save(state, tmp_path / "odd.pt")
    status = main(["inspect", "--trusted", str(tmp_path / "odd.pt")])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == "" and captured.err.count("\n") == 1
    assert captured.err == (
        "sumto inspect: error: expected a checkpoint sumto can describe, got RuntimeError: boom\n"
    )
