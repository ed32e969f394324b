"""sumto.cli: the ``sumto`` command, its help, and ``inspect`` on good and bad checkpoints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sumto
from reference import inspected_model, legacy_state_dict, run_inspect
from sumto.cli import main


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sumto", *argv], capture_output=True, text=True, timeout=120
    )


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


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


def _sums_line(out: str, key: str) -> list[float]:
    block = out.split(f"{key}: shape", 1)[1]
    line = next(x for x in block.splitlines() if x.strip().startswith("sums over dims"))
    return _numbers(line.split(":", 1)[1].split("(min")[0])


def test_inspect_prints_shapes_and_sums_of_every_constrained_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    model = inspected_model()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    status, out, err = run_inspect(path, capsys)
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
    status, out, _ = run_inspect(tmp_path / "tampered.pt", capsys)
    assert status == 0
    assert torch.allclose(torch.tensor(_sums_line(out, "0.weight")), torch.tensor([3.0, 4.0]))


def test_inspect_finds_state_dicts_nested_in_a_checkpoint_dict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    torch.save({"model": inspected_model().state_dict(), "epoch": 3}, tmp_path / "nested.pt")
    status, out, _ = run_inspect(tmp_path / "nested.pt", capsys)
    assert status == 0
    assert "model/0.weight: shape (3, 5)" in out and "model/2.bias: shape (2,)" in out


def test_inspect_of_a_plain_checkpoint_says_there_is_nothing_constrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    torch.save(sumto.bake(inspected_model()).state_dict(), tmp_path / "plain.pt")
    status, out, _ = run_inspect(tmp_path / "plain.pt", capsys)
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
    status, out, err = run_inspect(tmp_path / "odd.pt", capsys)
    assert status == 0 and err == ""
    assert "'FutureConstraint'" in out and "skipped" in out
    assert "parametrization 0 of '1.weight' is not a sumto constraint" in out
    # the bias has sum_to at index 0 (a trailing foreign map is invisible in a state_dict)
    assert torch.allclose(torch.tensor(_sums_line(out, "1.bias")), torch.tensor([1.0]))


def test_inspect_reads_the_extra_state_entries_of_older_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    model = inspected_model()
    torch.save(model.state_dict(), tmp_path / "new.pt")
    torch.save(legacy_state_dict(model), tmp_path / "old.pt")
    status, old, err = run_inspect(tmp_path / "old.pt", capsys)
    assert status == 0 and err == ""
    assert "4 sumto-constrained tensors" in old
    _, new, _ = run_inspect(tmp_path / "new.pt", capsys)
    assert old.replace("old.pt", "new.pt") == new


def test_inspect_of_a_plain_dict_copy_finds_nothing_constrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # dict(state_dict) drops the metadata that holds the configurations.
    torch.save(dict(inspected_model().state_dict()), tmp_path / "copy.pt")
    status, out, _ = run_inspect(tmp_path / "copy.pt", capsys)
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
    status, out, err = run_inspect(path, capsys)
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
    status, _, err = run_inspect(tmp_path / "other.pt", capsys)
    assert status == 1 and err.count("\n") == 1
    assert "expected a state_dict (a dict of name -> tensor) in" in err and kind in err


def test_inspect_of_a_pickled_module_explains_what_to_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    status, _, err = run_inspect(tmp_path / "module.pt", capsys)
    assert status == 1 and err.count("\n") == 1 and "state_dict()" in err


def test_inspect_of_a_missing_file_or_a_folder_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    status, _, err = run_inspect(tmp_path / "nope.pt", capsys)
    assert status == 1 and err.count("\n") == 1 and "no such file" in err
    status, _, err = run_inspect(tmp_path, capsys)
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
    status, out, err = run_inspect(tmp_path / "linear.pt", capsys)
    assert status == 0 and err == ""
    assert "2 sumto-constrained tensors" in out and out.count("LinearEquality(") == 2
    weight_sums = torch.tensor(_sums_line(out, "0.weight"), dtype=torch.float64)
    assert torch.allclose(weight_sums, model[0].weight.double().sum(1), atol=1e-6)
    assert torch.allclose(weight_sums, torch.ones(3, dtype=torch.float64), atol=1e-5)
    filter_sums = torch.tensor(_sums_line(out, "1.weight"), dtype=torch.float64)
    assert filter_sums.shape == (2,)
    assert float(filter_sums.abs().max()) < 1e-5
    assert out.count("within the rounding tolerance") == 2


def test_inspect_help_states_the_default_loader_and_the_risk_of_trusted(
    capsys: pytest.CaptureFixture[str],
):
    assert main(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "weights_only=True" in text and "argparse.Namespace" in text
    assert "--trusted" in text and "EXECUTES ARBITRARY CODE" in text and "(default: off)" in text


def test_demo_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]):
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "output folder (default: demo-out)" in out
    assert "optimiser steps per run (default: 400)" in out
    assert "random seed (default: 0)" in out
