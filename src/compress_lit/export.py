"""`python -m compress_lit.export checkpoint=<distillation .ckpt> format=onnx|torchscript`: the student for the edge.

Exports the student's **backbone alone** — what every evaluation uses: the 1q projection, the momentum student
and the queues stay behind — with the input shape ``(1, C, image_size, image_size)`` of the checkpoint's data
config (``image_size=`` overrides it; ONNX gets a dynamic batch axis). The file is written to a temporary path
beside its destination, checked against PyTorch, and only then renamed into place (``os.replace``): a failed
export or a failed parity check never leaves a file where a good one was (or where none was).

Parity: the exported model (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) and the PyTorch model run
on random N(0, 1) batches (batch 1 and ``parity.random_batch``) and on real images of the checkpoint's val split
(synthetic pixels normalised with the data's mean/std when the data is not available here); it passes when
``max |exported - torch| <= parity.tolerance * max |torch|`` (the output scale) over all of them.

Report (printed, and written as ``export_report.json`` / ``export_report.md`` to the run directory): parameters,
file size, FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add of the
convolutions and matrix products) and CPU latency per image at batch 1 (median of ``latency.runs`` runs, PyTorch
eager and the exported runtime) of the student and of its teacher's architecture (``teacher.*`` of the checkpoint's
config; built with random weights when the teacher's checkpoint file is not available here — FLOPs, parameters and
latency do not depend on the weights; the report says which). The teacher is exported to a temporary file to time
it in the same runtime (``teacher_runtime=false`` skips that).

``onnx_exporter``: ``dynamo`` (``torch.export``-based; needs the ``onnxscript`` package), ``legacy`` (the
TorchScript-based ``torch.onnx.export(dynamo=False)``), or ``auto`` (dynamo when onnxscript is importable).
"""
from __future__ import annotations

import logging

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .exporting.run import run_export
from .exporting.settings import ExportError
from .runtime.paths import config_dir
from .runtime.startup import USER_ERRORS, entry_main, run_entry

CONF_DIR = config_dir()  # conf/ of the checkout, or compress_lit/conf of an installed wheel


@entry_main("export")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.WARNING)
    run_entry("export", lambda: run_export(cfg, HydraConfig.get().runtime.output_dir),
              user_errors=(*USER_ERRORS, ExportError, ValueError))


if __name__ == "__main__":
    main()

