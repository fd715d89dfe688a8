"""The comparison's settings (``conf/reproduce.yaml`` and its presets: the schema Hydra checks), the metrics
and the methods' row labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

METRICS = ("1-NN", "20-NN", "cluster", "linear")


METHOD_LABELS = {"moco_scratch": "MoCo from scratch", "supervised": "supervised", "regression": "Regression",
                 "regression_bn": "Regression-BN", "crd": "CRD", "cc": "CC", "compress_2q": "CompReSS-2q",
                 "compress_1q": "CompReSS-1q", "compress_2q_nomomentum": "CompReSS-2q (no momentum)",
                 # the later self-supervised distillation methods (docs/family.md)
                 "seed": "SEED", "simreg": "SimReg", "disco": "DisCo"}


@dataclass
class AblationConfig:
    """``ablation.enabled=true``: after the table, the temperature and queue-size ablations of ``method`` on
    ``student`` (each value varied with the other at its centre)."""
    enabled: bool = False
    student: str = "alexnet_small"
    method: str = "compress_2q"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    temperature: float = 0.04  # the centre: the main table's setting
    queue_size: int = 4096
    temperatures: list[float] = field(default_factory=lambda: [0.02, 0.04, 0.07, 0.1])
    queue_sizes: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])


@dataclass
class TeacherBars:
    """What a teacher worth compressing must show (points of top-1): a linear-probe lead over raw pixels, a 1-NN no
    further below raw pixels than ``knn_below_pixels``, and a 1-NN lead over MoCo from scratch on each student."""
    linear_over_pixels: float = 4.0
    knn_below_pixels: float = 1.0
    knn_over_scratch: float = 3.0


@dataclass
class TeacherCheckConfig:
    """``enabled``: the teacher and the raw pixels are scored side by side by ``compress_lit.evaluate`` with
    ``args`` (by default on the whole train split: the protocol the teacher was built and judged on), and the
    table states each bar on that probe and on the table's own protocol."""
    enabled: bool = False
    args: list[str] = field(default_factory=list)  # compress_lit.evaluate overrides shared by both runs
    bars: TeacherBars = field(default_factory=TeacherBars)


@dataclass
class CandidateConfig:
    """One setting tried by the calibration (``reproduce_preset=calibrate``): ``overrides`` on top of the preset's
    arguments for ``method`` on ``student``; the candidates of one ``group`` compete on ``metric``. ``within`` > 0
    makes the group a convergence search: the first-listed candidate (list them cheapest first) scoring within
    ``within`` points of the group's best is chosen, not the best itself (more epochs that add less than that are
    not worth their cost). Every candidate of a group gives the same ``metric`` and ``within``."""
    group: str = MISSING
    label: str = MISSING
    method: str = MISSING
    student: str = "alexnet_small"
    overrides: list[str] = field(default_factory=list)
    metric: str = "1-NN"
    within: float = 0.0


@dataclass
class ReproduceConfig:
    name: str = MISSING  # preset name, used in the output file names
    out_dir: str = "results"
    data_name: str = "fashion_mnist"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    students: list[str] = field(default_factory=lambda: ["alexnet_small", "resnet18_small"])
    methods: list[str] = field(default_factory=lambda: list(METHOD_LABELS)[:8])
    # the later family (SEED, SimReg, DisCo): rows of the same table, run by `part=family` (`make reproduce-family`)
    family_methods: list[str] = field(default_factory=list)
    # main: the teacher and `methods`; family: `family_methods` (the main rows are read from their finished runs,
    # never run); all: both; teacher: only build (or check) the teacher (`make reproduce-teacher`); table: run
    # nothing, write the table from the runs finished so far (an interrupted reproduction's progress); record: run
    # and write nothing, only record the finished runs into `progress` (after a run was stopped by force)
    part: str = "all"
    # which preset's teacher to use (default: this preset's own, results/teacher/<name>_teacher.ckpt)
    teacher_name: Optional[str] = None
    teacher_args: list[str] = field(default_factory=list)  # compress_lit.pretrain overrides for the teacher
    teacher_overrides: list[str] = field(default_factory=list)  # compress_lit.train overrides that describe it
    common_args: list[str] = field(default_factory=list)  # every student run (data, epochs, eval)
    scratch_args: list[str] = field(default_factory=list)  # MoCo-from-scratch runs only
    train_args: list[str] = field(default_factory=list)  # distillation / supervised runs only
    # per method: overrides of that method's runs only (a calibrated temperature must not reach SEED's teacher)
    method_args: dict[str, list[str]] = field(default_factory=dict)
    # methods that run the teacher at every step read it from the K-view feature cache instead (teachers/cache.py):
    # the cache is built once (by the first such run, alone) and shared by every student, seed and method
    cached_methods: list[str] = field(default_factory=list)
    cache_args: list[str] = field(default_factory=list)  # the teacher.cached=... overrides for those runs
    # student runs at once; each gets cpu_count // jobs threads (two one-thread runs use 2 cores better than one
    # two-thread run for these small networks)
    jobs: int = 1
    ablation: AblationConfig = field(default_factory=AblationConfig)
    teacher_check: TeacherCheckConfig = field(default_factory=TeacherCheckConfig)
    candidates: list[CandidateConfig] = field(default_factory=list)  # non-empty: a calibration (validation split)
    dry_run: bool = False  # print the commands only
    # a tracked file of the finished runs' records (run_records.py): read back as finished runs before running,
    # written after; lets a reproduction longer than one machine's life continue elsewhere. null: runs/ only
    progress: Optional[str] = None
    # every student run's trainer.precision (null: the preset's, in common_args). `auto` is resolved for this
    # machine in each run's command line (precision.py), so a run's key and record name the precision it ran in
    precision: Optional[str] = None
    # false: no run evaluates the reference rows (random init, teacher, raw pixels): a partial rerun of some rows
    # whose commands then equal the table's own but for what it changes (reproduce_preset=fp32)
    references: bool = True


ConfigStore.instance().store(name="reproduce_schema", node=ReproduceConfig)


PARTS = ("all", "main", "family", "teacher", "table", "record")
