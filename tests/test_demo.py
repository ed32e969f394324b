"""sumto._demo, run end to end through ``sumto demo``: summary, figures, exact optima."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from reference import SHARPEN_DIAGONAL
from sumto._demo.optimum import simplex_least_squares
from sumto.cli import main

TARGET = SHARPEN_DIAGONAL
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("weights.png", "kernels.png", "kernel_losses.png")
FLOAT32_EPS = torch.finfo(torch.float32).eps


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
