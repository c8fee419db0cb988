"""What `pip install rigl` gets: the licence, true metadata, the extras, and a CLI that
works with torch alone (the slow test builds the wheel and installs it into a fresh
virtualenv next to nothing but torch)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rigl._extras import EXTRAS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_license_file_is_the_apache_2_text_and_is_packaged():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_metadata_claims_only_what_is_true():
    classifiers = PROJECT["classifiers"]
    # a licence expression replaces licence classifiers (setuptools refuses both)
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert "Typing :: Typed" in classifiers and (ROOT / "src/rigl/py.typed").exists()
    assert "urls" not in PROJECT  # no public URL exists yet; none is invented
    assert PROJECT["keywords"] and PROJECT["dependencies"] == ["torch>=2.1"]


def test_extras_table_matches_pyproject():
    """rigl._extras names the extra that brings each optional package; it must agree with
    pyproject.toml (every runtime extra's packages, and no other)."""
    declared = {
        _name(req): extra
        for extra, reqs in PROJECT["optional-dependencies"].items()
        if extra != "dev"  # test tools, never imported by the package
        for req in reqs
    }
    table = {dist: extras for dist, extras in EXTRAS.values()}
    assert set(table) == set(declared)
    for dist, extras in table.items():
        for extra in extras:
            assert dist in map(_name, PROJECT["optional-dependencies"][extra]), (dist, extra)
    assert "tensorboard" in PROJECT["optional-dependencies"]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_with_only_torch(tmp_path):
    """Build the wheel, install it with --no-deps into a fresh venv that has only
    torch==2.13.0 (from the package cache / registry), and run the CLI there."""
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:  # a clean copy: building writes build/ and *.egg-info
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        path = ROOT / name
        if path.is_symlink():
            (src / name).symlink_to(os.readlink(path))
        elif path.is_file():
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = lambda *cmd, **kw: subprocess.run(  # noqa: E731
        [str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=900, **kw
    )
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "-w", tmp_path / "dist", src)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("rigl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "rigl/configs/mnist1d_mlp.yaml" in names and "rigl/sparse/csrc/" in " ".join(names)

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip, rigl = venv / "bin" / "pip", venv / "bin" / "rigl"
    start = time.perf_counter()
    torch = run(pip, "install", "-q", "torch==2.13.0")
    print(f"pip install torch==2.13.0: {time.perf_counter() - start:.0f} s")
    assert torch.returncode == 0, torch.stderr
    assert run(pip, "install", "-q", "--no-deps", wheel).returncode == 0
    listed = run(pip, "list", "--format=freeze").stdout.lower()
    assert "numpy" not in listed and "pyyaml" not in listed and "rigl==" in listed

    start = time.perf_counter()
    helps = run(rigl, "--help")
    print(f"rigl --help: {time.perf_counter() - start:.2f} s")
    assert helps.returncode == 0 and "compare" in helps.stdout
    assert run(rigl, "--version").stdout == "rigl 0.1.0\n"
    assert run(rigl, "flops", "--help").returncode == 0
    flops = run(rigl, "flops", "--model", "lenet300_100", "--sparsity", "0.9")
    assert flops.returncode == 0 and "inference FLOPs" in flops.stdout, flops.stderr
    for command in (["train", "--dataset", "mnist1d"], ["compare", "--preset", "main"]):
        result = run(rigl, *command)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().endswith('pip install "rigl[experiments]"'), result.stderr
    for result in (helps, flops):
        assert "Traceback" not in result.stderr and "Warning" not in result.stderr
