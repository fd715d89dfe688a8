"""Where the Hydra configs are: the one function every entry point asks (``config_dir()``).

The configs live in ``conf/`` at the repository root. A wheel ships the same files inside the package, as
``compress_lit/conf/`` (``pyproject.toml`` maps the package ``compress_lit.conf`` onto ``conf/``), so:

* installed from a wheel (``pip install compress_lit-*.whl``): ``<site-packages>/compress_lit/conf``;
* a source checkout (editable install, or ``PYTHONPATH=src``): ``<repo>/conf``, next to ``src/``.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # compress_lit/ (this file is compress_lit/runtime/paths.py)


class ConfigDirNotFound(FileNotFoundError):
    """Neither the packaged nor the checkout config folder exists (a broken install)."""


def config_dir_candidates() -> tuple[Path, Path]:
    """The packaged folder (wheel installs), then the source checkout's ``conf/``."""
    return PACKAGE_DIR / "conf", PACKAGE_DIR.parents[1] / "conf"


def config_dir() -> str:
    """Absolute path of the folder holding ``train.yaml`` and the config groups (for ``hydra.main``)."""
    for candidate in config_dir_candidates():
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    tried = " and ".join(str(c) for c in config_dir_candidates())
    raise ConfigDirNotFound(f"compress_lit's configs not found: no train.yaml in {tried} (a wheel ships them as "
                            f"compress_lit/conf; a source checkout has them in conf/ next to src/)")


__all__ = ["ConfigDirNotFound", "config_dir", "config_dir_candidates"]
