"""Moved: the cached teacher lives in :mod:`compress_lit.teachers.cache`. This name is the same module object
(importing it, or monkeypatching it, acts on ``compress_lit.teachers.cache``)."""
import sys

from .teachers import cache as _cache

sys.modules[__name__] = _cache
