"""Moved: teacher loading lives in the package :mod:`compress_lit.teachers` (one module per checkpoint format).
This name is the same module object as ``compress_lit.teachers`` (``FrozenTeacher``, ``build_teacher``,
``TeacherLoadError``, ``load_backbone_state``, ``simclr_tf_key_map``, ``CHECKPOINT_FORMATS``)."""
import sys

from . import teachers as _teachers

sys.modules[__name__] = _teachers
