"""The export's settings (``conf/export.yaml``: the schema Hydra checks) and its error."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

FORMATS = ("onnx", "torchscript")


ONNX_EXPORTERS = ("auto", "dynamo", "legacy")


SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


RUNTIME = {"onnx": "onnxruntime", "torchscript": "torchscript"}


class ExportError(RuntimeError):
    """The export cannot be made or does not match PyTorch; the message names the file / the numbers."""


# ------------------------------------------------------------------------------------------------------------
# config schema
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ParitySettings:
    tolerance: float = 1e-4  # max |exported - torch| <= tolerance * max |torch| (the output scale)
    random_inputs: int = 2  # random N(0, 1) batches of each size (batch 1 and random_batch)
    random_batch: int = 3  # the second random batch size (ONNX: exercises the dynamic batch axis)
    real_inputs: int = 8  # val images of the checkpoint's data (synthetic pixels when unavailable); 0: none


@dataclass
class LatencySettings:
    runs: int = 50  # timed runs at batch 1; the median is reported
    warmup: int = 5
    threads: Optional[int] = 1  # intra-op threads of torch and onnxruntime (None: torch's default count)


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a compress_lit distillation (student.*) or pretraining (backbone.*) checkpoint
    format: str = "onnx"  # onnx | torchscript
    output: Optional[str] = None  # None: <run dir>/<student name>.onnx|.torchscript.pt; a folder: that name in it
    image_size: Optional[int] = None  # None: the checkpoint's data.image_size
    dynamic_batch: bool = True  # ONNX: dynamic batch axis
    opset: int = 18
    onnx_exporter: str = "auto"  # auto | dynamo | legacy
    parity: ParitySettings = field(default_factory=ParitySettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    compare_teacher: bool = True  # report the teacher's architecture beside the student
    teacher_runtime: bool = True  # also export the teacher (temporary file) to time it in the exported runtime
    seed: int = 0


def register_export_configs() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


register_export_configs()
