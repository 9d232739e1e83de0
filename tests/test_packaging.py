"""The built wheel: models/ and analysis/ install as bmrs_pyro.models and bmrs_pyro.analysis,
nothing generically named lands at the top of site-packages, and both import from outside the
repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_models_and_analysis_inside_the_package(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, cwd=tmp_path, capture_output=True)
    wheel = next(dist.glob("bmrs_pyro-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"bmrs_pyro"}, top  # no top-level `models` or `analysis`
    assert "bmrs_pyro/models/lenet.py" in names and "bmrs_pyro/analysis/plots.py" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # From outside the repository, with the wheel's files first on the path (the development
    # checkout is installed in editable mode, whose finder only answers for what is not found).
    code = ("import bmrs_pyro, bmrs_pyro.models, bmrs_pyro.analysis, bmrs_pyro.cli;"
            "print(bmrs_pyro.__file__); print(bmrs_pyro.models.__file__); print(bmrs_pyro.analysis.__file__);"
            "print(sorted(bmrs_pyro.models.MODELS))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}).stdout.split("\n")
    for path in out[:3]:
        assert path.startswith(str(site)), out
    assert "lenet5" in out[3] and "mlp" in out[3]
