"""sumto._demo, run end to end through ``sumto demo``: summary, figures, exact optima."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from reference import SHARPEN, SHARPEN_DIAGONAL
from sumto._demo.optimum import simplex_least_squares
from sumto.cli import main

TARGET = SHARPEN_DIAGONAL
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("weights.png", "kernels.png", "kernel_losses.png")
REAL_FIGURES = ("real_kernels.png", "real_ensemble.png")
FLOAT32_EPS = torch.finfo(torch.float32).eps
# The real-data section reads photos and a data set shipped inside these packages.
HAVE_REAL = all(importlib.util.find_spec(m) is not None for m in ("skimage", "sklearn"))
needs_real = pytest.mark.skipif(
    not HAVE_REAL,
    reason="scikit-image and scikit-learn (the demo extra's real-data packages) are not installed",
)
# The short CLI runs include the real-data section wherever its packages are installed.
REAL_FLAG = [] if HAVE_REAL else ["--no-real"]


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
    status = main(["demo", "--out", str(out), "--steps", "30", "--seed", "3", *REAL_FLAG])
    return {"status": status, "out": out, "summary": json.loads((out / "summary.json").read_text())}


def test_demo_short_run_writes_strict_json_with_the_documented_keys(
    short_demo: dict[str, Any],
) -> None:
    assert short_demo["status"] == 0
    summary = short_demo["summary"]
    assert {"fusion", "kernel", "missing", "config"} <= summary.keys()
    assert {"learned", "optimal", "max_abs_error"} <= summary["fusion"].keys()
    kernel_keys = {"target", "learned", "max_abs_error", "softmax_max_abs_error", "naive_normalise"}
    assert kernel_keys <= summary["kernel"].keys()
    assert {"learned", "optimal", "max_abs_error"} <= summary["missing"].keys()
    config = {"seed": 3, "steps": 30, "real": HAVE_REAL, "torch": torch.__version__}
    assert summary["config"] == config
    assert summary["kernel"]["target"] == TARGET
    # strict JSON: no NaN/Infinity tokens (json.loads would accept them silently)
    text = (short_demo["out"] / "summary.json").read_text()

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    json.loads(text, parse_constant=reject)
    fields = [summary["fusion"], summary["missing"]]
    fields += [{k: v for k, v in summary["kernel"].items() if not k.startswith("naive")}]
    assert all(_all_finite(f) for f in fields)


def test_demo_short_run_weights_lie_on_their_sets(short_demo: dict[str, Any]) -> None:
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
    # the loss figure's floor: no simplex kernel, softmax's included, goes below it
    assert 0.0 < kernel["simplex_optimum_loss"] <= kernel["softmax_final_loss"] * (1 + 1e-6)
    assert isinstance(kernel["naive_normalise"], str)
    assert "zero initialisation" in kernel["naive_normalise"]


def test_demo_short_run_writes_valid_pngs(short_demo: dict[str, Any]) -> None:
    from PIL import Image  # a matplotlib dependency, so part of the demo extra

    for name in FIGURES + (REAL_FIGURES if HAVE_REAL else ()):
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


def test_demo_is_deterministic_for_a_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for run in ("a", "b"):
        # the real section's determinism is checked on its own, below
        args = ["demo", "--out", str(tmp_path / run), "--steps", "5", "--seed", "7", "--no-real"]
        assert main(args) == 0
        outputs.append(json.loads((tmp_path / run / "summary.json").read_text()))
    # Training is bit-reproducible; the float64 KKT polish goes through LAPACK, whose
    # last bit can depend on buffer alignment (MKL/OpenBLAS kernels), so floats are
    # compared to 1e-12 relative and everything else exactly.
    _assert_same_summary(outputs[0], outputs[1])
    stdout = capsys.readouterr().out
    assert "1. Fusion" in stdout and "2. Kernel" in stdout and "3. Missing inputs" in stdout
    assert "4. Real photos" not in stdout and "real" not in outputs[0]


@pytest.mark.slow
def test_demo_at_default_steps_matches_the_exact_optima(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path), *REAL_FLAG]) == 0
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
    if HAVE_REAL:
        real = summary["real"]
        assert real["kernel"]["sum_to_max_abs_error"] < 1e-4
        assert real["kernel"]["sum_to_min_psnr_db"] > 100.0
        ensemble = real["ensemble"]
        assert ensemble["max_abs_error"] < 0.02
        assert ensemble["test_accuracy"]["learned"] >= ensemble["test_accuracy"]["uniform"] - 0.01
        assert ensemble["test_nll"]["learned"] < ensemble["test_nll"]["uniform"]
        assert "4. Real photos" in table and "5. Real classifiers" in table


def test_demo_without_the_extra_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["demo", "--out", str(tmp_path / "out"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "sumto[demo]" in err and "expected" in err
    assert not (tmp_path / "out").exists()


def test_demo_rejects_a_non_positive_step_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", "0"]) == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_demo_output_folder_that_is_a_file_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writable output folder" in err


def test_simplex_least_squares_matches_support_enumeration() -> None:
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


# ---------------------------------------------------------------------------
# the real-data section
# ---------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _no_bar(total: int, desc: str) -> _NoBar:
    return _NoBar()


@pytest.fixture(scope="module")
def real_photos() -> dict[str, Any]:
    """The photo experiment on a quick configuration: 2 crops of 32x32 per photo."""
    from sumto._demo.photos import run_photos

    return run_photos(0, 300, _no_bar, crops=2, size=32)


@pytest.fixture(scope="module")
def real_ensemble() -> dict[str, Any]:
    from sumto._demo.ensemble import run_ensemble

    return run_ensemble(0, 300, _no_bar)


def _photo_cases(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    grey = summary["grey"]
    return [("cross", grey["cross"]), ("diagonal", grey["diagonal"]), ("colour", summary["colour"])]


@needs_real
def test_real_photos_sum_to_recovers_every_kernel_and_the_others_cannot(
    real_photos: dict[str, Any],
) -> None:
    summary = real_photos["summary"]
    targets = {"cross": [SHARPEN], "diagonal": [SHARPEN_DIAGONAL]}
    targets["colour"] = [SHARPEN, SHARPEN_DIAGONAL, SHARPEN]
    for name, case in _photo_cases(summary):
        assert case["target"] == targets[name]
        sum_to = case["approaches"]["sum_to"]
        learned = torch.tensor(sum_to["learned"], dtype=torch.float64)
        target = torch.tensor(targets[name], dtype=torch.float64)
        assert float((learned - target).abs().max()) == pytest.approx(sum_to["max_abs_error"])
        assert sum_to["max_abs_error"] < 1e-4, name
        for total in sum_to["sums"]:  # one sum per output channel, at every step
            assert abs(total - 1.0) <= 8 * 9 * 5 * FLOAT32_EPS
        assert sum_to["psnr_db"] > 80.0, name
        others = {k: v for k, v in case["approaches"].items() if k != "sum_to"}
        assert {"unconstrained", "softmax"} <= others.keys()
        for approach, result in others.items():
            assert result["psnr_db"] < sum_to["psnr_db"] - 30.0, (name, approach)
        # a simplex kernel has no entry above 1, so it misses the centre 5 by 4 or more
        assert others["softmax"]["max_abs_error"] >= 4.0 - 1e-4
        # the target is far from the input: doing nothing scores low
        assert case["identity_psnr_db"] < 30.0
        conditions = case["gram_condition"]
        assert 1.0 <= conditions["sum_zero"] < conditions["all"]
    assert summary["sum_to_max_abs_error"] == max(
        c["approaches"]["sum_to"]["max_abs_error"] for _, c in _photo_cases(summary)
    )


@needs_real
def test_real_photos_psnr_matches_an_independent_float64_filter(
    real_photos: dict[str, Any],
) -> None:
    from sumto._demo.photos import load_photo

    summary = real_photos["summary"]
    case = summary["grey"]["cross"]
    photo = load_photo(summary["held_out_photo"]["grey"], colour=False).double().unsqueeze(0)
    target = F.conv2d(photo, torch.tensor(SHARPEN, dtype=torch.float64).view(1, 1, 3, 3))
    for approach in ("unconstrained", "softmax"):
        kernel = torch.tensor(case["approaches"][approach]["learned"], dtype=torch.float64)
        mse = float(((F.conv2d(photo, kernel.view(1, 1, 3, 3)) - target) ** 2).mean())
        want = 10.0 * math.log10(1.0 / mse)
        assert case["approaches"][approach]["psnr_db"] == pytest.approx(want, abs=1e-3)


@needs_real
def test_real_photos_are_deterministic_for_a_seed() -> None:
    from sumto._demo.photos import run_photos

    a, b = (run_photos(5, 3, _no_bar, crops=1, size=16)["summary"] for _ in range(2))
    _assert_same_summary(a, b)


@needs_real
def test_real_ensemble_weights_match_the_exact_optimum_and_beat_uniform(
    real_ensemble: dict[str, Any],
) -> None:
    summary = real_ensemble["summary"]
    names = summary["models"]
    assert len(names) >= 5
    learned = torch.tensor([summary["learned_weights"][n] for n in names], dtype=torch.float64)
    optimal = torch.tensor([summary["optimal_weights"][n] for n in names], dtype=torch.float64)
    for w in (learned, optimal):
        assert bool((w >= 0).all()) and abs(float(w.sum()) - 1.0) <= 8 * len(w) * FLOAT32_EPS
    assert summary["max_abs_error"] < 0.02
    assert summary["validation_nll"]["learned"] >= summary["validation_nll"]["optimum"] - 1e-6
    accuracy, nll = summary["test_accuracy"], summary["test_nll"]
    assert accuracy["learned"] > 0.9
    assert accuracy["learned"] >= accuracy["uniform"] - 0.01
    assert accuracy["learned"] >= accuracy["best_single"] - 0.02
    assert nll["learned"] < nll["uniform"]
    # the best single model is the most accurate on validation, scored on test
    best = summary["best_single_model"]
    assert summary["validation_accuracy"][best] == max(summary["validation_accuracy"].values())
    assert accuracy["best_single"] == summary["model_test_accuracy"][best]
    assert nll["best_single"] == summary["model_test_nll"][best]
    # the mix is a mix of good and weak models, and the weak ones get little weight
    weak = [n for n in names if summary["model_test_accuracy"][n] < 0.9]
    assert weak and all(summary["learned_weights"][n] < 0.05 for n in weak)


def test_em_optimum_satisfies_the_kkt_conditions_of_the_mixture_nll() -> None:
    from sumto._demo.ensemble import _em_optimum

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        k, n, c = 3 + trial % 3, 200, 4
        probs = torch.distributions.Dirichlet(torch.full((c,), 0.5)).sample((k, n))
        probs = probs.double().clamp_min(1e-6)
        labels = torch.randint(0, c, (n,), generator=g)
        result = _em_optimum(probs, labels, iterations=200_000)
        w = result["weights"]
        picked = probs[:, torch.arange(n), labels]  # (k, n)
        # gradient of the mean NLL; sum_k w_k grad_k = -1, so the multiplier is -1
        grad = -(picked / (w @ picked)).mean(1)
        support = w > 1e-6
        assert torch.allclose(grad[support], torch.full_like(grad[support], -1.0), atol=1e-6)
        assert bool((grad[~support] >= -1.0 - 1e-6).all())
        assert abs(float(w.sum()) - 1.0) < 1e-12 and bool((w >= 0).all())
        assert result["nll"] == pytest.approx(float(-(w @ picked).log().mean()), rel=1e-12)


@needs_real
def test_demo_short_run_has_the_real_section(short_demo: dict[str, Any]) -> None:
    real = short_demo["summary"]["real"]
    assert {"kernel", "ensemble"} <= real.keys()
    kernel, ensemble = real["kernel"], real["ensemble"]
    assert {"grey", "colour", "sum_to_max_abs_error", "sum_to_min_psnr_db"} <= kernel.keys()
    assert {"cross", "diagonal"} == kernel["grey"].keys()
    for case in (kernel["grey"]["cross"], kernel["grey"]["diagonal"], kernel["colour"]):
        for result in case["approaches"].values():
            assert {"learned", "max_abs_error", "psnr_db", "sums"} <= result.keys()
    keys = {"learned_weights", "optimal_weights", "test_accuracy", "test_nll"}
    assert keys <= ensemble.keys()
    assert {"learned", "uniform", "best_single"} == ensemble["test_accuracy"].keys()
    assert _all_finite(ensemble)
    assert _all_finite({k: v for k, v in kernel.items() if k != "grey"})


def test_demo_without_the_real_packages_names_the_flag_and_runs_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    assert main(["demo", "--out", str(tmp_path / "a"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sumto[demo]" in err and "--no-real" in err
    assert main(["demo", "--out", str(tmp_path / "b"), "--steps", "1", "--no-real"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "real" not in summary and summary["config"]["real"] is False
    assert not (tmp_path / "b" / "real_kernels.png").exists()
