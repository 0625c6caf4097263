"""The data folder, in AUTOMATIC1111's layout, so an existing A1111 install's folders work unchanged."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MuralistError


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

    def ensure(self) -> list[str]:
        """Create the folders a fresh install needs; returns warnings for model folders that cannot be.

        Model folders may live on a read-only mount (an A1111 ``models/`` folder mounted read-only in a
        container): a missing one there only means none of that kind. muralist's own folders
        (outputs, cache) must be writable.
        """
        warnings = []
        for p in (self.ckpt_dir, self.vae_dir, self.lora_dir, self.embeddings_dir):
            try:
                p.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                warnings.append(f"{p} is missing and cannot be created ({e.strerror or e}); "
                                "models of that kind are not available until it exists")
        for p in (self.outputs_dir, self.cache_dir):
            try:
                p.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MuralistError(f"cannot create {p} ({e.strerror or e}): the data folder must be writable "
                                    "(use --data-dir for a writable one and --ckpt-dir etc. for read-only model folders)") from None
        return warnings
