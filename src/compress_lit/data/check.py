"""``python -m compress_lit.data.check data.root=<folder>``: every problem of an image tree in one pass.

Training meets an unreadable image only when it reads it (one error, at that step, hours in). This command walks
``<root>/train`` and ``<root>/val`` (or ``<root>`` itself when it has no such splits) once and reports every
file that will not train: images PIL cannot decode (truncated, corrupt, not an image despite the extension),
files beside the images that are not images at all, empty class folders, val classes missing from train, and
images in an unusual colour mode (CMYK, 16-bit, palette: decoded and converted, listed so it is no surprise). Exit
status 0 when every image decodes, 1 otherwise, with one line per problem and a summary line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .datasets import IMG_EXTENSIONS

ODD_MODES = {"CMYK", "I;16", "I", "F", "P", "LA", "PA", "YCbCr"}


def check_tree(root: str | os.PathLike) -> tuple[list[str], int]:
    """(problems, images checked) of the image tree at ``root`` (see the module docstring)."""
    from PIL import Image

    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        return [f"{root}: no such folder (data.root must hold train/<class>/ and val/<class>/)"], 0
    splits = [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]
    problems, checked = [], 0
    train_classes = None
    for split in splits:
        classes = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            problems.append(f"{split}: no class folders (expected {split}/<class>/<images>)")
            continue
        if split.name == "train":
            train_classes = set(classes)
        elif split.name == "val" and train_classes is not None:
            problems += [f"{split / c}: class not in train/" for c in classes if c not in train_classes]
        for c in classes:
            images = 0
            for dirpath, dirnames, filenames in os.walk(split / c, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    if name.startswith("."):
                        continue
                    if not name.lower().endswith(IMG_EXTENSIONS):
                        problems.append(f"{path}: not an image file (skipped by the loader; extensions read: "
                                        f"{', '.join(IMG_EXTENSIONS)})")
                        continue
                    images += 1
                    checked += 1
                    try:
                        with Image.open(path) as img:
                            mode = img.mode
                            img.load()
                    except Exception as e:  # noqa: BLE001 - any decoding failure is a problem to list
                        problems.append(f"{path}: cannot be decoded ({type(e).__name__}: {e})")
                        continue
                    if mode in ODD_MODES:
                        problems.append(f"{path}: colour mode {mode} (decoded and converted to RGB; check it looks "
                                        f"right)")
            if images == 0:
                problems.append(f"{split / c}: no images")
    return problems, checked


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    roots = [a.split("=", 1)[1] for a in argv if a.startswith(("data.root=", "root="))]
    if not roots or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().splitlines()[0].replace("``", ""))
        return 0 if roots or argv else 2
    problems, checked = check_tree(roots[0])
    for p in problems:
        print(p)
    undecodable = sum("cannot be decoded" in p or "no such folder" in p or "no images" in p or "no class" in p
                      or "class not in train" in p for p in problems)
    print(f"compress_lit.data.check: {checked} images checked under {roots[0]}: "
          f"{undecodable} problem(s) that stop training, {len(problems) - undecodable} note(s)")
    return 1 if undecodable else 0


if __name__ == "__main__":
    sys.exit(main())
