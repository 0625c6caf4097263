"""Shared fixtures: an A1111-style data folder with tiny random-weight models, built once per session.

The models are real SD1.x/SD2.x/SDXL architectures in A1111's key layout (see muralist.models.tiny),
written as .safetensors and .ckpt and read back through the production loader.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def a1111_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder whose models/ holds the tiny model set (read-only for tests: copy before changing)."""
    from muralist.models.family import Family
    from muralist.models.tiny import make_tiny_models, save, tiny_checkpoint

    root = tmp_path_factory.mktemp("a1111")
    ckpt = root / "models" / "Stable-diffusion"
    make_tiny_models(ckpt, root / "models" / "VAE", root / "models" / "ControlNet")
    # The same SD1 weights as .ckpt, to show both formats load to the same model.
    save(tiny_checkpoint(Family.SD1), ckpt / "same-as-sd15.ckpt")
    return root


@pytest.fixture(scope="session")
def engine(a1111_models: Path):
    from muralist.engine.engine import Engine, ModelCache
    from muralist.paths import DataDirs

    return Engine(DataDirs.from_options(a1111_models), cache=ModelCache(max_models=3, device="cpu"))


def pixels(image):
    import numpy as np

    return np.asarray(image).astype(np.int16)
