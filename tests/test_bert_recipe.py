"""The BERT layer-mixing recipe (docs/recipes.md and examples/bert_layer_mix.py).

Both build a small ``transformers`` BERT from a config (random weights, nothing is
downloaded), so they run only where ``transformers`` is installed (the dev extra).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from test_docs_snippets import extract_blocks

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## ELMo/BERT-style layer mixing over a transformers model"


def _recipe_block() -> str:
    """The code block of the recipe's section (skipped by the docs snippet test)."""
    page = ROOT / "docs" / "recipes.md"
    start = page.read_text(encoding="utf-8").splitlines().index(SECTION) + 1
    blocks = [b for b in extract_blocks(page) if b.line > start and b.language == "python"]
    assert blocks and blocks[0].skipped
    return blocks[0].code


def test_docs_recipe_runs_and_learns(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {"__name__": "recipe"}
    exec(compile(_recipe_block(), "docs/recipes.md", "exec"), namespace)  # its own asserts
    mix = namespace["mix"]
    assert mix.layer_norm and mix.dropout == 0.1 and mix.num_inputs == 5
    assert "tensor(" in capsys.readouterr().out


def test_example_script_learns_the_embedding_layer() -> None:
    path = ROOT / "examples" / "bert_layer_mix.py"
    spec = importlib.util.spec_from_file_location("_example_bert_layer_mix", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--steps", "80"])
    assert result["last_loss"] < 0.7 * result["first_loss"]
    weights = result["weights"]
    assert weights.shape == (5,) and torch.isclose(weights.sum(), torch.tensor(1.0))
    assert bool((weights >= 0).all())
