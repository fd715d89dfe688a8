"""The notebooks under notebooks/ run top to bottom (nbclient) on digits, and are stored without outputs.

Each runs in a temporary working directory with its own feature cache (``COMPRESS_LIT_CACHE``) and trains its own
tiny runs (the env vars that point a notebook at existing runs are unset). The kernel is this interpreter
(``sys.executable``) through a kernel spec written to a temporary folder, so no kernel needs to be installed and a
``python3`` spec elsewhere on the machine cannot pick another environment.
"""
import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "compress_lit_test"


def _kernel_manager(tmp_path):
    """A KernelManager for this interpreter, from a kernel spec written under ``tmp_path``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "compress_lit (test)", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _run(name, tmp_path, **env):
    """Execute notebooks/<name> in ``tmp_path/work``; returns (all text outputs, number of PNG outputs, work)."""
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESS_LIT_CACHE", str(tmp_path / "cache"))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("PYTORCH_LIGHTNING_DISABLE_TIPS", "1")
        for var in ("COMPRESS_LIT_NOTEBOOK_CKPT", "COMPRESS_LIT_NOTEBOOK_RUNS", "COMPRESS_LIT_NOTEBOOK_THREADS",
                    "MPLBACKEND"):
            mp.delenv(var, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, allow_errors=True,
                                         resources={"metadata": {"path": str(work)}})
        t0 = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - t0
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: cells raised {errors}"
    texts, pngs = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                texts.append(o.text)
            elif o.output_type in ("display_data", "execute_result"):
                texts += [o.data.get("text/plain", ""), o.data.get("text/markdown", "")]
                pngs += "image/png" in o.data
    print(f"{name}: {seconds:.0f} s")
    return "\n".join(texts), pngs, work


def test_student_vs_teacher_notebook(tmp_path):
    text, pngs, work = _run("01_student_vs_teacher.ipynb", tmp_path)
    out = work / "outputs" / "notebooks" / "01_student_vs_teacher"
    assert (out / "compress_2q" / "checkpoints" / "last.ckpt").exists()  # the tiny run made in the notebook
    assert "teacher: loaded from" in text  # the in-notebook teacher, not random weights
    assert "| model | 1-NN | 20-NN | cluster (3 seeds) | NMI |" in text
    assert "| student (resnet18_small, compress_2q) |" in text and "| teacher (demo) |" in text
    assert pngs == 2  # the student's and the teacher's cluster grid
    assert (out / "cluster_grid_student.png").is_file() and (out / "cluster_grid_teacher.png").is_file()


def test_compare_runs_notebook_then_a_given_checkpoint(tmp_path):
    text, pngs, work = _run("02_compare_runs.ipynb", tmp_path)
    out = work / "outputs" / "notebooks" / "02_compare_runs"
    for method in ("compress_2q", "compress_1q"):
        assert (out / method / "results.json").is_file()
        assert f"student ({method})" in text
    assert "top-1 (%) on the held-out split" in text and "1-NN" in text and "linear" in text
    assert text.count("compress_2q  teacher (demo)") == 1  # the same teacher's row is shown once
    assert pngs == 1 and (out / "runs_compared.png").is_file()

    # notebook 01 on a checkpoint given by COMPRESS_LIT_NOTEBOOK_CKPT (the 1q run above): nothing is trained
    ckpt = out / "compress_1q" / "checkpoints" / "last.ckpt"
    text, pngs, work = _run("01_student_vs_teacher.ipynb", tmp_path / "given", COMPRESS_LIT_NOTEBOOK_CKPT=str(ckpt))
    assert f"student checkpoint: {ckpt}" in text and "| student (resnet18_small, compress_1q) |" in text
    assert "teacher: loaded from" in text and pngs == 2
    assert not (work / "outputs" / "notebooks" / "01_student_vs_teacher" / "compress_2q").exists()


@pytest.mark.parametrize("name", ["01_student_vs_teacher.ipynb", "02_compare_runs.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: clear the outputs before committing"
