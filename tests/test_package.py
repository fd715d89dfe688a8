"""Installable as a package: the wheel ships the Hydra configs, and an installed copy finds them.

The wheel is built from a copy of the project (``pip wheel --no-deps --no-build-isolation``), installed with
``--no-deps`` into a fresh virtual environment that sees this environment's packages (torch, hydra, ...) through a
``.pth`` line, and its entry points are run from an unrelated folder. Nothing is downloaded or reinstalled.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from compress_lit.runtime.paths import config_dir, config_dir_candidates

ROOT = Path(__file__).resolve().parents[1]


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(path.read_text())


def test_package_list_names_every_package_and_ships_every_config():
    st = _toml(ROOT / "pyproject.toml")["tool"]["setuptools"]
    package_root = ROOT / "src" / "compress_lit"
    code = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in package_root.rglob("__init__.py")
            if "__pycache__" not in p.parts}
    assert {"compress_lit", "compress_lit.models", "compress_lit.evaluation"} <= code
    listed = set(st["packages"])
    missing, extra = code - listed, listed - code - {"compress_lit.conf"}
    assert not missing and not extra, f"pyproject.toml [tool.setuptools] packages: add {missing}, remove {extra}"
    assert "compress_lit.conf" in listed and st["package-dir"] == {"": "src", "compress_lit.conf": "conf"}
    assert st["package-data"]["compress_lit.conf"] == ["*.yaml", "**/*.yaml"]
    # only YAML files ship: anything else in conf/ would be missing from an installed copy
    others = [str(p) for p in (ROOT / "conf").rglob("*") if p.is_file() and p.suffix != ".yaml"
              and "__pycache__" not in p.parts]
    assert not others, f"conf/ holds files the wheel does not ship: {others}"


def test_checkout_finds_conf_at_the_repository_root():
    packaged, checkout = config_dir_candidates()
    assert packaged == ROOT / "src" / "compress_lit" / "conf" and not packaged.exists()
    assert config_dir() == str(checkout) == str(ROOT / "conf")


def _run(cmd, cwd, env, timeout=180) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_installed_in_a_fresh_venv_runs_from_another_folder(tmp_path):
    # 1. build the wheel from a copy (the in-tree build's build/ and egg-info stay out of the working tree)
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", project / "src", ignore=ignore)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=ignore)
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(wheels)], cwd=tmp_path, env=env)
    (wheel,) = wheels.glob("compress_lit-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    yamls = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert {f"compress_lit/conf/{y}" for y in yamls} <= names and "compress_lit/conf/hydra/launcher/slurm.yaml" in names

    # 2. a fresh venv; install the wheel first (pip then cannot see, let alone touch, this environment's packages)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp_path, env=env)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env).strip()
    # ... then let it see torch, hydra etc. of this environment (a plain path line: this environment's own .pth
    # files, e.g. the editable install's src/ path, are not processed, so nothing can shadow the installed copy)
    (Path(purelib) / "_compress_lit_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    # 3. the installed copy, run from an unrelated folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run([python, "-c", "import compress_lit, compress_lit.runtime.paths as p; print(compress_lit.__file__); "
                              "print(p.config_dir())"], elsewhere, env).split()
    installed = Path(purelib) / "compress_lit"
    assert out == [str(installed / "__init__.py"), str(installed / "conf")]
    job = _run([python, "-m", "compress_lit.train", "--cfg", "job"], elsewhere, env)
    assert "student:" in job and "teacher:" in job and "method:" in job and "name: digits" in job
    # another entry point, a nested group (experiment/paper) and the hydra/launcher group from the packaged conf
    cfg = _run([python, "-m", "compress_lit.evaluate", "--cfg", "all", "checkpoint=x.ckpt", "hydra/launcher=slurm",
                "data=imagenet"], elsewhere, env)
    assert "submitit_slurm" in cfg.lower() or "SlurmLauncher" in cfg
    assert "timeout_min: 4320" in cfg and "checkpoint: x.ckpt" in cfg
    paper = _run([python, "-m", "compress_lit.train", "--cfg", "job", "experiment=paper/mocov2_r50_to_alexnet"],
                 elsewhere, env)
    assert "arch: alexnet" in paper
    assert not any(elsewhere.iterdir())  # --cfg writes nothing
