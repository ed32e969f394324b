"""Every script in examples/: it runs from the command line and prints its result.

Each example runs as a script (``runpy`` with ``__name__ == "__main__"`` and its
command line in ``sys.argv``, small sizes, in this process to spare a torch import) and
its printed lines are checked; this catches a broken ``__main__`` block or argument
parser that an import-and-call test would miss. How well each one learns is tested
where its subject is (the WeightedSum examples in ``test_weighted_sum.py``, the
Lightning example in ``test_lightning.py``) and below for the plain compiled loop.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from reference import load_example

ROOT = Path(__file__).resolve().parents[1]

# name -> (small arguments, patterns every run must print)
EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    "weighted_sum_fixed_k": (["--steps", "20"], [r"layer weights \[", r"sum=1\.0000"]),
    "weighted_sum_bias_batched": (["--steps", "20"], [r"max weight error \d", r"bias error"]),
    "weighted_sum_varying_inputs": (["--steps", "20"], [r"learned weights \{'camera'"]),
    "plain_loop_compile_amp": (
        ["--steps", "10", "--backend", "eager"],
        [r"kernel sum = 1\.000000", r"constraint violation: \{'weight'", r"peak lr"],
    ),
    "lightning_constrained": (
        ["--epochs", "1", "--samples", "64"],
        [r"max violation after resume \d", r"identical weights: True; trained to epoch 2"],
    ),
    "bert_layer_mix": (["--steps", "3"], [r"loss: first \d", r"layer weights \[.*sum=1\.0000"]),
    "learn_permutation": (
        ["--n", "5", "--steps", "20"],
        [r"true permutation", r"row/column sums: max violation \d"],
    ),
}
# examples that need a package outside the library's own dependencies
NEEDS = {"lightning_constrained": "lightning", "bert_layer_mix": "transformers"}
NEEDS["learn_permutation"] = "scipy"


def test_every_example_is_run_here() -> None:
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py")}
    assert scripts == set(EXAMPLES), "add each example to EXAMPLES (and remove deleted ones)"


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_as_a_script(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"needs {NEEDS[name]}, in the dev extra: pip install -e '.[dev]'")
    argv, patterns = EXAMPLES[name]
    script = ROOT / "examples" / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    for pattern in patterns:
        assert re.search(pattern, out), f"{pattern!r} not in:\n{out}"


@pytest.mark.usefixtures("fresh_dynamo")
def test_plain_loop_learns_the_kernel_in_one_compiled_graph() -> None:
    torch._dynamo.utils.counters.clear()
    result = load_example("plain_loop_compile_amp").main(
        ["--steps", "80", "--backend", "aot_eager"]
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert result["out_dtype"] == "torch.bfloat16"  # the convolution ran under autocast
    assert result["kernel_error"] < 0.25
    # The constraint holds to float32 rounding although the forward ran in bfloat16.
    assert abs(result["kernel_sum"] - 1.0) < 1e-5
    assert result["violation"]["weight"] < 1e-5
    assert result["clipped"] > 0  # early steps were clipped
    lrs = result["lrs"]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[-1] < lrs[0] < lrs[peak]  # one cycle
