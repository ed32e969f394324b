"""Release: the built wheel and sdist are valid and the wheel works on its own.

Builds the sdist and the wheel once (``python -m build --no-isolation``, with the
hatchling of the dev environment), checks their metadata with ``twine check --strict``
and their contents, then installs the wheel into a fresh virtual environment (no
system site-packages, no access to this checkout) and runs a constraint there.

Installing torch into that environment unpacks gigabytes, so by default the fresh
environment sees the running environment's torch through a path entry (a plain
``sys.path`` directory: its ``.pth`` files, among them the editable install of this
checkout, are not processed) and the test checks that ``sumto`` is not importable
there before the wheel is installed. ``SUMTO_RELEASE_TORCH=install`` (set by CI)
installs torch into the fresh environment instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

import sumto

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# Never in a distribution: local environments, caches and build outputs.
_FORBIDDEN = re.compile(
    r"(^|/)(\.venv|\.hypothesis|\.pytest_cache|\.mypy_cache|\.ruff_cache|__pycache__|\.git|"
    r"site|dist|build|demo-out|bench-out)(/|$)|\.pyc$"
)


def _run(*args: str | Path, cwd: Path = ROOT, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", out)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_version_is_single_sourced(dist: dict[str, Path]) -> None:
    version_file = (ROOT / "src" / "sumto" / "_version.py").read_text(encoding="utf-8")
    assert re.search(rf'^__version__ = "{re.escape(sumto.__version__)}"$', version_file, re.M)
    assert dist["wheel"].name == f"sumto-{sumto.__version__}-py3-none-any.whl"
    assert dist["sdist"].name == f"sumto-{sumto.__version__}.tar.gz"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{sumto.__version__}]" in changelog


def test_twine_check_passes(dist: dict[str, Path]) -> None:
    output = _run(sys.executable, "-m", "twine", "check", "--strict", *dist.values())
    assert output.count("PASSED") == 2, output


def test_wheel_metadata_and_contents(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
        info = f"sumto-{sumto.__version__}.dist-info"
        metadata = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert metadata["Name"] == "sumto"
    assert metadata["Version"] == sumto.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata.get_all("Requires-Dist", [""])[0].startswith("torch>=")
    assert metadata["Description-Content-Type"] == "text/markdown"
    classifiers = metadata.get_all("Classifier", [])
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL", []))
    assert {"Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert "sumto = sumto.cli:main" in entry_points
    assert f"{info}/licenses/LICENSE" in names
    assert "sumto/py.typed" in names
    assert "sumto/__init__.py" in names
    assert all(n.startswith(("sumto/", info)) for n in names), names
    assert not [n for n in names if _FORBIDDEN.search(n)]


def test_sdist_has_sources_and_no_local_files(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = [n.split("/", 1)[1] for n in sdist.getnames() if "/" in n]
    for required in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "PKG-INFO"):
        assert required in names
    assert "src/sumto/__init__.py" in names
    assert not [n for n in names if _FORBIDDEN.search(n)], names


def test_wheel_installs_and_runs_in_a_fresh_venv(dist: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # No pip inside: the running environment's pip installs into it (pip --python).
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile"]
    if os.environ.get("SUMTO_RELEASE_TORCH") == "install":
        # torch==2.13.0 resolves from the local wheel cache; the pin keeps pip from choosing
        # another build for "torch>=2.5".
        _run(*pip, "torch==2.13.0", dist["wheel"], timeout=600)
    else:
        site = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
        torch_dir = Path(torch.__file__).resolve().parents[1]
        (Path(site.strip()) / "_test_release_torch.pth").write_text(f"{torch_dir}\n")
        probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('sumto'))"
        found = _run(python, "-I", "-c", probe, cwd=tmp_path).strip()
        assert found.startswith("ModuleSpec(name='torch'") and found.endswith(" None"), found
        # --ignore-installed: the shared directory's sumto metadata (an editable install)
        # must neither satisfy nor be uninstalled by this install.
        _run(*pip, "--no-deps", "--ignore-installed", dist["wheel"], timeout=300)
    script = textwrap.dedent(
        """
        import json
        import importlib.metadata
        import torch
        from torch import nn
        import sumto

        layer = sumto.simplex(nn.Linear(5, 3))
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            layer(torch.randn(4, 5)).square().mean().backward()
            opt.step()
        print(json.dumps({
            "file": sumto.__file__,
            "version": sumto.__version__,
            "metadata_version": importlib.metadata.version("sumto"),
            "sums": layer.weight.sum(dim=1).tolist(),
            "min": float(layer.weight.min()),
            "check": sumto.check(layer),
        }))
        """
    )
    # -I: ignore PYTHONPATH and the user site; run outside the checkout.
    report = json.loads(_run(python, "-I", "-c", script, cwd=tmp_path).splitlines()[-1])
    assert Path(report["file"]).is_relative_to(venv)
    assert report["version"] == report["metadata_version"] == sumto.__version__
    assert all(abs(s - 1.0) < 1e-5 for s in report["sums"])
    assert report["min"] >= 0.0
    assert report["check"]["weight"] < 1e-5
