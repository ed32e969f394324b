"""The ``sumto`` command: ``demo`` end to end, ``inspect`` on good and bad files."""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import json
import math
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sumto
from reference import SHARPEN_DIAGONAL, legacy_state_dict
from sumto._demo.optimum import simplex_least_squares
from sumto.cli import main

TARGET = SHARPEN_DIAGONAL
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("weights.png", "kernels.png", "kernel_losses.png")
FLOAT32_EPS = torch.finfo(torch.float32).eps


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sumto", *argv], capture_output=True, text=True, timeout=120
    )


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def _all_finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


# ---------------------------------------------------------------------------
# sumto demo
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short demo run (30 steps) shared by the structural checks."""
    out = tmp_path_factory.mktemp("demo")
    status = main(["demo", "--out", str(out), "--steps", "30", "--seed", "3"])
    return {"status": status, "out": out, "summary": json.loads((out / "summary.json").read_text())}


def test_demo_short_run_writes_strict_json_with_the_documented_keys(short_demo: dict[str, Any]):
    assert short_demo["status"] == 0
    summary = short_demo["summary"]
    assert {"fusion", "kernel", "missing", "config"} <= summary.keys()
    assert {"learned", "optimal", "max_abs_error"} <= summary["fusion"].keys()
    kernel_keys = {"target", "learned", "max_abs_error", "softmax_max_abs_error", "naive_normalise"}
    assert kernel_keys <= summary["kernel"].keys()
    assert {"learned", "optimal", "max_abs_error"} <= summary["missing"].keys()
    assert summary["config"] == {"seed": 3, "steps": 30, "torch": torch.__version__}
    assert summary["kernel"]["target"] == TARGET
    # strict JSON: no NaN/Infinity tokens (json.loads would accept them silently)
    text = (short_demo["out"] / "summary.json").read_text()

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    json.loads(text, parse_constant=reject)
    fields = [summary["fusion"], summary["missing"]]
    fields += [{k: v for k, v in summary["kernel"].items() if not k.startswith("naive")}]
    assert all(_all_finite(f) for f in fields)


def test_demo_short_run_weights_lie_on_their_sets(short_demo: dict[str, Any]):
    summary = short_demo["summary"]
    for experiment in ("fusion", "missing"):
        for key in ("learned", "optimal"):
            w = torch.tensor(summary[experiment][key], dtype=torch.float64)
            assert bool((w >= 0).all()), (experiment, key, w)
            assert abs(float(w.sum()) - 1.0) <= 8 * len(w) * FLOAT32_EPS, (experiment, key, w)
        learned = torch.tensor(summary[experiment]["learned"], dtype=torch.float64)
        optimal = torch.tensor(summary[experiment]["optimal"], dtype=torch.float64)
        error = float((learned - optimal).abs().max())
        assert summary[experiment]["max_abs_error"] == pytest.approx(error, abs=1e-12)
    kernel = summary["kernel"]
    learned = torch.tensor(kernel["learned"], dtype=torch.float64)
    magnitude = float(learned.abs().sum()) + 1.0
    assert abs(float(learned.sum()) - 1.0) <= 8 * 9 * FLOAT32_EPS * magnitude
    softmax = torch.tensor(kernel["softmax_learned"], dtype=torch.float64)
    assert bool((softmax >= 0).all())
    assert abs(float(softmax.sum()) - 1.0) <= 8 * 9 * FLOAT32_EPS
    # No simplex kernel has a centre above 1, so it misses the centre 5 by at least 4.
    assert kernel["softmax_max_abs_error"] >= 4.0 - 1e-6
    assert kernel["simplex_optimum_max_abs_error"] == pytest.approx(4.0, abs=1e-9)
    assert isinstance(kernel["naive_normalise"], str)
    assert "zero initialisation" in kernel["naive_normalise"]


def test_demo_short_run_writes_valid_pngs(short_demo: dict[str, Any]):
    from PIL import Image  # a matplotlib dependency, so part of the demo extra

    for name in FIGURES:
        path = short_demo["out"] / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
        assert width >= 300 and height >= 200, (name, width, height)


def _assert_same_summary(a: object, b: object, path: str = "summary") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same_summary(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_summary(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_demo_is_deterministic_for_a_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    outputs = []
    for run in ("a", "b"):
        assert main(["demo", "--out", str(tmp_path / run), "--steps", "5", "--seed", "7"]) == 0
        outputs.append(json.loads((tmp_path / run / "summary.json").read_text()))
    # Training is bit-reproducible; the float64 KKT polish goes through LAPACK, whose
    # last bit can depend on buffer alignment (MKL/OpenBLAS kernels), so floats are
    # compared to 1e-12 relative and everything else exactly.
    _assert_same_summary(outputs[0], outputs[1])
    stdout = capsys.readouterr().out
    assert "1. Fusion" in stdout and "2. Kernel" in stdout and "3. Missing inputs" in stdout


@pytest.mark.slow
def test_demo_at_default_steps_matches_the_exact_optima(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["steps"] == 400
    assert summary["fusion"]["max_abs_error"] < 1e-5
    assert summary["fusion"]["optimum_kkt_residual"] < 1e-12
    assert summary["kernel"]["max_abs_error"] < 1e-4
    assert summary["kernel"]["softmax_max_abs_error"] == pytest.approx(4.0, abs=1e-2)
    assert summary["missing"]["max_abs_error"] < 1e-5
    missing = summary["missing"]
    assert missing["test_mse_masked"] < missing["test_mse_zero_fill"]
    table = capsys.readouterr().out
    assert "max |learned - optimum|" in table


def test_demo_without_the_extra_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["demo", "--out", str(tmp_path / "out"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "sumto[demo]" in err and "expected" in err
    assert not (tmp_path / "out").exists()


def test_demo_rejects_a_non_positive_step_count(capsys: pytest.CaptureFixture[str]):
    assert main(["demo", "--steps", "0"]) == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_demo_output_folder_that_is_a_file_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writable output folder" in err


def test_simplex_least_squares_matches_support_enumeration():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        k = 2 + trial % 5
        a = torch.randn(3 * k, k, generator=g, dtype=torch.float64)
        target = torch.randn(3 * k, generator=g, dtype=torch.float64) * (trial % 3)
        gram, rhs = a.T @ a, a.T @ target
        best, best_value = None, math.inf
        for size in range(1, k + 1):  # exact: solve the KKT system on every support
            for support in itertools.combinations(range(k), size):
                s = list(support)
                system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
                system[:size, :size] = gram[s][:, s]
                system[:size, size] = 1.0
                system[size, :size] = 1.0
                sol = torch.linalg.solve(system, torch.cat([rhs[s], torch.ones(1).double()]))
                w = torch.zeros(k, dtype=torch.float64)
                w[s] = sol[:size]
                value = float(0.5 * w @ gram @ w - rhs @ w)
                if bool((w >= 0).all()) and value < best_value:
                    best, best_value = w, value
        result = simplex_least_squares(gram, rhs)
        assert best is not None
        scale = float(gram.abs().max() + rhs.abs().max())
        assert torch.allclose(result["weights"], best, atol=1e-9, rtol=0), (trial, result, best)
        assert result["kkt_residual"] <= 1e-10 * scale


def test_help_runs_as_a_module():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "inspect" in result.stdout


def test_subcommand_help_lists_the_options(capsys: pytest.CaptureFixture[str]):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--out DIR" in out and "--steps N" in out and "--seed S" in out
    assert main(["inspect", "--help"]) == 0
    assert "CHECKPOINT" in capsys.readouterr().out


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_core_and_cli_work_without_the_demo_extra(tmp_path: Path):
    # None in sys.modules makes every import of matplotlib/tqdm fail, as if not installed.
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['tqdm'] = None\n"
        "import torch, sumto\n"
        "from sumto.cli import main\n"
        "w = sumto.simplex(torch.nn.Linear(3, 2)).weight\n"
        "print(bool(torch.allclose(w.sum(1), torch.ones(2))))\n"
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'out')!r}, '--steps', '1']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "True", result.stderr
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "pip install 'sumto[demo]'" in result.stderr


# ---------------------------------------------------------------------------
# sumto inspect
# ---------------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    totals = torch.arange(1.0, 5.0).view(4, 1, 1, 1)
    model = nn.Sequential(
        sumto.simplex(nn.Linear(5, 3)),
        sumto.sum_to(nn.Conv2d(2, 4, 3), total=totals),
        sumto.box_sum(nn.Linear(6, 2), total=2.0, dim=0, lower=-0.5, upper=1.0),
    )
    sumto.simplex(model[2], "bias", method="sparsemax")
    return model


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["inspect", str(path)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _sums_line(out: str, key: str) -> list[float]:
    block = out.split(f"{key}: shape", 1)[1]
    line = next(x for x in block.splitlines() if x.strip().startswith("sums over dims"))
    return _numbers(line.split(":", 1)[1].split("(min")[0])


def test_inspect_prints_shapes_and_sums_of_every_constrained_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    model = _model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    status, out, err = _inspect(path, capsys)
    assert status == 0 and err == ""
    assert "4 sumto-constrained tensors" in out
    assert "0.weight: shape (3, 5)" in out
    assert "1.weight: shape (4, 2, 3, 3)" in out
    assert "2.weight: shape (2, 6)" in out
    assert "2.bias: shape (2,)" in out
    expected = {
        "0.weight": model[0].weight.double().sum(1),
        "1.weight": model[1].weight.double().sum((1, 2, 3)),
        "2.weight": model[2].weight.double().sum(0),
        "2.bias": model[2].bias.double().sum().reshape(1),
    }
    for key, sums in expected.items():
        printed = torch.tensor(_sums_line(out, key), dtype=torch.float64)
        assert printed.shape == sums.shape, (key, out)
        # printed with 7 significant digits
        assert torch.allclose(printed, sums, rtol=1e-6, atol=1e-6), (key, printed, sums)
    assert torch.allclose(
        torch.tensor(_sums_line(out, "1.weight")), torch.arange(1.0, 5.0), atol=1e-5
    )
    assert out.count("within the rounding tolerance") == 4
    assert "OUTSIDE" not in out


def test_inspect_rebuilds_tensor_totals_from_their_saved_buffers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # The per-slice totals come from the checkpoint, not from a default: change them
    # in the file and the printed sums follow.
    model = nn.Sequential(sumto.sum_to(nn.Linear(4, 2), total=torch.tensor([[1.0], [2.0]])))
    state = model.state_dict()
    state["0.parametrizations.weight.0.total"] = torch.tensor([[3.0], [4.0]])
    torch.save(state, tmp_path / "tampered.pt")
    status, out, _ = _inspect(tmp_path / "tampered.pt", capsys)
    assert status == 0
    assert torch.allclose(torch.tensor(_sums_line(out, "0.weight")), torch.tensor([3.0, 4.0]))


def test_inspect_finds_state_dicts_nested_in_a_checkpoint_dict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    torch.save({"model": _model().state_dict(), "epoch": 3}, tmp_path / "nested.pt")
    status, out, _ = _inspect(tmp_path / "nested.pt", capsys)
    assert status == 0
    assert "model/0.weight: shape (3, 5)" in out and "model/2.bias: shape (2,)" in out


def test_inspect_of_a_plain_checkpoint_says_there_is_nothing_constrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    torch.save(sumto.bake(_model()).state_dict(), tmp_path / "plain.pt")
    status, out, _ = _inspect(tmp_path / "plain.pt", capsys)
    assert status == 0 and "no sumto-constrained tensors" in out


def test_inspect_skips_unknown_classes_and_foreign_parametrizations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    model = nn.Sequential(sumto.simplex(nn.Linear(3, 2)), nn.Linear(3, 2))
    parametrize.register_parametrization(model[1], "weight", Double())
    sumto.sum_to(model[1], "bias", total=1.0)
    parametrize.register_parametrization(model[1], "bias", Double())
    state = model.state_dict()
    configs = state._metadata["0"]["sumto.constraints"]
    extra = dict(configs["parametrizations.weight.0"])
    configs["parametrizations.weight.0"] = {**extra, "class": "FutureConstraint"}
    # a foreign parametrization *before* a sumto one: index 0 has no saved state
    state._metadata["1"]["sumto.constraints"]["parametrizations.weight.1"] = extra
    torch.save(state, tmp_path / "odd.pt")
    status, out, err = _inspect(tmp_path / "odd.pt", capsys)
    assert status == 0 and err == ""
    assert "'FutureConstraint'" in out and "skipped" in out
    assert "parametrization 0 of '1.weight' is not a sumto constraint" in out
    # the bias has sum_to at index 0 (a trailing foreign map is invisible in a state_dict)
    assert torch.allclose(torch.tensor(_sums_line(out, "1.bias")), torch.tensor([1.0]))


def test_inspect_reads_the_extra_state_entries_of_older_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "new.pt")
    torch.save(legacy_state_dict(model), tmp_path / "old.pt")
    status, old, err = _inspect(tmp_path / "old.pt", capsys)
    assert status == 0 and err == ""
    assert "4 sumto-constrained tensors" in old
    _, new, _ = _inspect(tmp_path / "new.pt", capsys)
    assert old.replace("old.pt", "new.pt") == new


def test_inspect_of_a_plain_dict_copy_finds_nothing_constrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # dict(state_dict) drops the metadata that holds the configurations.
    torch.save(dict(_model().state_dict()), tmp_path / "copy.pt")
    status, out, _ = _inspect(tmp_path / "copy.pt", capsys)
    assert status == 0 and "no sumto-constrained tensors" in out


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"definitely not a checkpoint", "a zip archive"),
        (b"", "empty file"),
        (b"PK\x03\x04 truncated zip", "BadZipFile"),
    ],
)
def test_inspect_of_a_corrupt_file_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, reason: str
):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    status, out, err = _inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sumto inspect: error: expected")
    assert reason in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("obj", "kind"), [([1, 2], "list"), (torch.zeros(3), "Tensor"), ({1: torch.zeros(1)}, "dict")]
)
def test_inspect_of_something_else_than_a_state_dict_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], obj: Any, kind: str
):
    torch.save(obj, tmp_path / "other.pt")
    status, _, err = _inspect(tmp_path / "other.pt", capsys)
    assert status == 1 and err.count("\n") == 1
    assert "expected a state_dict (a dict of name -> tensor) in" in err and kind in err


def test_inspect_of_a_pickled_module_explains_what_to_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    status, _, err = _inspect(tmp_path / "module.pt", capsys)
    assert status == 1 and err.count("\n") == 1 and "state_dict()" in err


def test_inspect_of_a_missing_file_or_a_folder_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    status, _, err = _inspect(tmp_path / "nope.pt", capsys)
    assert status == 1 and err.count("\n") == 1 and "no such file" in err
    status, _, err = _inspect(tmp_path, capsys)
    assert status == 1 and err.count("\n") == 1 and "not a regular file" in err


def test_inspect_as_a_process_prints_no_traceback(tmp_path: Path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"\x80\x04garbage")
    result = _run("inspect", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_inspect_rebuilds_linear_equality_constraints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    torch.manual_seed(0)
    a = [[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 0.0]]  # rows sum to 1, first two equal
    model = nn.Sequential(
        sumto.linear_equality(nn.Linear(4, 3), A=a, b=[1.0, 0.0]),
        sumto.bayar(nn.Conv2d(1, 2, 5)),  # centre -1, the rest sums to 1: filter sum 0
    )
    torch.save(model.state_dict(), tmp_path / "linear.pt")
    status, out, err = _inspect(tmp_path / "linear.pt", capsys)
    assert status == 0 and err == ""
    assert "2 sumto-constrained tensors" in out and out.count("LinearEquality(") == 2
    weight_sums = torch.tensor(_sums_line(out, "0.weight"), dtype=torch.float64)
    assert torch.allclose(weight_sums, model[0].weight.double().sum(1), atol=1e-6)
    assert torch.allclose(weight_sums, torch.ones(3, dtype=torch.float64), atol=1e-5)
    filter_sums = torch.tensor(_sums_line(out, "1.weight"), dtype=torch.float64)
    assert filter_sums.shape == (2,)
    assert float(filter_sums.abs().max()) < 1e-5
    assert out.count("within the rounding tolerance") == 2


# ---------------------------------------------------------------------------
# sumto inspect on hostile files, and ordinary training checkpoints
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
    status, out, err = _inspect(path, capsys)
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
    status, out, err = _inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sumto inspect: error: expected")
    assert reason in err


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_inspect_of_a_truncated_checkpoint_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: float
):
    path = tmp_path / "cut.pt"
    torch.save(_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    status, out, err = _inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sumto inspect: error: expected")


def test_inspect_reads_a_training_checkpoint_with_namespace_and_numpy_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    np = pytest.importorskip("numpy")
    model = _model()
    checkpoint = {
        "state_dict": model.state_dict(),
        "args": argparse.Namespace(lr=0.1),
        "step": np.int64(3),
    }
    torch.save(checkpoint, tmp_path / "train.pt")
    status, out, err = _inspect(tmp_path / "train.pt", capsys)
    assert status == 0 and err == ""
    assert "4 sumto-constrained tensors" in out
    assert "state_dict/0.weight: shape (3, 5)" in out and "Simplex(" in out
    assert out.count("within the rounding tolerance") == 4


def test_the_default_loader_returns_common_checkpoint_values_intact(tmp_path: Path):
    from sumto._safe_load import load_checkpoint

    np = pytest.importorskip("numpy")
    model = _model()
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
    torch.save({"state_dict": _model().state_dict(), "extra": _Opaque()}, path)
    status, out, err = _inspect(path, capsys)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and "--trusted" in err and "_Opaque'" in err
    assert main(["inspect", "--trusted", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "4 sumto-constrained tensors" in captured.out


def test_inspect_names_trusted_for_legacy_files_and_reads_them_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "legacy.pt"
    torch.save(_model().state_dict(), path, _use_new_zipfile_serialization=False)
    status, _, err = _inspect(path, capsys)
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
    status, _, err = _inspect(tmp_path / "meta.pt", capsys)  # no data: refused by default
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


def test_inspect_help_states_the_default_loader_and_the_risk_of_trusted(
    capsys: pytest.CaptureFixture[str],
):
    assert main(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "weights_only=True" in text and "argparse.Namespace" in text
    assert "--trusted" in text and "EXECUTES ARBITRARY CODE" in text and "(default: off)" in text
