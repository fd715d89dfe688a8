"""Teachers: the one place that reads teacher checkpoints, the frozen wrapper and the feature cache.

* :mod:`.checkpoint`: reading a file and checking its keys against the backbone (shared by every format);
* :mod:`.formats`: one module per release family (``moco``, ``swav``, ``simclr``, ``torchvision``,
  ``compress_lit``, ``dino``, ``dinov2``, ``mocov3``, ``barlowtwins``, ``vicreg``), each a key table and its checks;
* :mod:`.loading`: :func:`build_teacher` / :func:`load_backbone_state`;
* :mod:`.frozen`: :class:`FrozenTeacher`;
* :mod:`.cache`: the cached teacher (features computed once, looked up by dataset index).

Every public release has its own key layout (docs/teachers.md). Each format maps the file's keys onto the
backbone's own parameter names *explicitly*, and the result is checked key by key: a missing key, an unexpected
key or a shape mismatch is an error that names the file, the format and the keys. ``random`` (no checkpoint: the
randomly initialised backbone, for sanity runs) is the one format without a file.
"""
from __future__ import annotations

from .checkpoint import CheckpointFormat, TeacherLoadError
from .formats import CHECKPOINT_FORMATS, FORMATS
from .formats.simclr import simclr_tf_key_map
from .frozen import FrozenTeacher
from .loading import build_teacher, load_backbone_state

__all__ = ["CHECKPOINT_FORMATS", "CheckpointFormat", "FORMATS", "FrozenTeacher", "TeacherLoadError", "build_teacher",
           "load_backbone_state", "simclr_tf_key_map"]
