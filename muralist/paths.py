"""The data folder, in AUTOMATIC1111's layout, so an existing A1111 install's folders work unchanged."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` (parents created) under a temporary name, then rename it, so a
    reader (gallery, download, registry scan, folder watcher) never sees a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@dataclass(frozen=True)
class DataDirs:
    """Where models, embeddings and outputs live.

    ``root`` is the data folder (``--data-dir``, env ``MURALIST_DATA_DIR``, default ``./data``);
    each model folder may be pointed elsewhere (``--ckpt-dir`` etc.), e.g. at an A1111 install.
    """

    root: Path
    ckpt_dir: Path
    vae_dir: Path
    lora_dir: Path
    embeddings_dir: Path
    outputs_dir: Path
    controlnet_dir: Path

    @classmethod
    def from_options(
        cls,
        data_dir: str | os.PathLike[str] | None = None,
        ckpt_dir: str | os.PathLike[str] | None = None,
        vae_dir: str | os.PathLike[str] | None = None,
        lora_dir: str | os.PathLike[str] | None = None,
        embeddings_dir: str | os.PathLike[str] | None = None,
        outputs_dir: str | os.PathLike[str] | None = None,
        controlnet_dir: str | os.PathLike[str] | None = None,
    ) -> DataDirs:
        root = Path(data_dir or os.environ.get("MURALIST_DATA_DIR") or "data").expanduser().resolve()

        def pick(value: str | os.PathLike[str] | None, default: Path) -> Path:
            return Path(value).expanduser().resolve() if value else default

        return cls(
            root=root,
            ckpt_dir=pick(ckpt_dir, root / "models" / "Stable-diffusion"),
            vae_dir=pick(vae_dir, root / "models" / "VAE"),
            lora_dir=pick(lora_dir, root / "models" / "Lora"),
            embeddings_dir=pick(embeddings_dir, root / "embeddings"),
            outputs_dir=pick(outputs_dir, root / "outputs"),
            # sd-webui-controlnet's folder (also read: the extension's own models/ folder).
            controlnet_dir=pick(controlnet_dir, root / "models" / "ControlNet"),
        )

    @property
    def cache_dir(self) -> Path:
        """muralist's own files (hash cache, built tokenizer files)."""
        return self.root / "cache"

    def ensure(self) -> None:
        """Create the folders a fresh install needs (model folders of an existing install are left alone)."""
        for p in (self.ckpt_dir, self.vae_dir, self.lora_dir, self.embeddings_dir, self.outputs_dir, self.cache_dir):
            p.mkdir(parents=True, exist_ok=True)
