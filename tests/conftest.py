"""Shared fixtures: an A1111-style data folder with tiny random-weight models, built once per session.

The models are real SD1.x/SD2.x/SDXL architectures in A1111's key layout (see muralist.models.tiny),
written as .safetensors and .ckpt and read back through the production loader.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def link_file(src: Path, dst: Path) -> Path:
    """Put a shared fixture file into a test's own folder as a hard link (a copy where links fail).

    About a hundred tests each need the 155 MB tiny model set; copies filled CI's disk. A test may
    add, replace or delete files in its folder, but must never write into a linked file: the
    a1111_models fixture checks its files are unchanged at the end of the session.
    """
    if dst.is_dir():
        dst = dst / src.name
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def link_tree(src: Path, dst: Path) -> Path:
    """link_file for every file of a folder (see there)."""
    shutil.copytree(src, dst, copy_function=lambda s, d: str(link_file(Path(s), Path(d))))
    return dst


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def a1111_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data folder whose models/ holds the tiny model set (read-only for tests: link or copy it)."""
    from muralist.models.family import Family
    from muralist.models.tiny import make_tiny_models, save, tiny_checkpoint

    root = tmp_path_factory.mktemp("a1111")
    ckpt = root / "models" / "Stable-diffusion"
    make_tiny_models(ckpt, root / "models" / "VAE", root / "models" / "ControlNet")
    # The same SD1 weights as .ckpt, to show both formats load to the same model.
    save(tiny_checkpoint(Family.SD1), ckpt / "same-as-sd15.ckpt")
    before = _stamps(root / "models")
    yield root
    # Tests share these files through hard links: one written in place would change every later test.
    after = _stamps(root / "models")
    changed = sorted(name for name, stamp in before.items() if after.get(name) != stamp)
    assert not changed, f"a test changed the shared tiny models (write to a new file instead): {changed}"


@pytest.fixture(scope="session")
def engine(a1111_models: Path):
    from muralist.engine.engine import Engine, ModelCache
    from muralist.paths import DataDirs

    return Engine(DataDirs.from_options(a1111_models), cache=ModelCache(max_models=3, device="cpu"))


def pixels(image):
    import numpy as np

    return np.asarray(image).astype(np.int16)
