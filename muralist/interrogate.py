"""Image captioning ("interrogate") with a BLIP model from a local folder, never a hub.

A1111's "CLIP" interrogator captions with BLIP and then appends CLIP-ranked artist/flavour
terms; muralist returns the BLIP caption (the ranking needs open_clip and its hub data).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .errors import MuralistError
from .paths import DataDirs

if TYPE_CHECKING:  # the manager imports torch: services create an Interrogator before any heavy import
    from .models.manager import ModelManager


def _folder_version(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """The folder's files with their mtimes and sizes: changes when any of them is replaced."""
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()


class Interrogator:
    """BLIP captioning; the model is kept in ``manager`` (the worker's, or a private one)."""

    def __init__(self, dirs: DataDirs, manager: ModelManager | None = None) -> None:
        self.folder = dirs.root / "models" / "BLIP"
        self._manager = manager
        self._lock = threading.Lock()

    @property
    def manager(self) -> ModelManager:
        """The manager holding the BLIP model; a private one is made on first use."""
        if self._manager is None:
            from .models.manager import ModelManager

            self._manager = ModelManager("cpu")
        return self._manager

    def model_dir(self) -> Path:
        """The first transformers BLIP folder (one with a config.json) under models/BLIP."""
        if self.folder.is_dir():
            for cfg in sorted(self.folder.glob("**/config.json")):
                return cfg.parent
        raise MuralistError(
            f"no captioning model: put a transformers BLIP captioning folder "
            f"(config.json, weights, processor files) in {self.folder}"
        )

    def caption(self, image: Image.Image, max_new_tokens: int = 40) -> str:
        import torch

        from .models.manager import file_bytes

        folder = self.model_dir()
        key = (str(folder), _folder_version(folder))

        def load() -> tuple[Any, Any]:
            from transformers import BlipForConditionalGeneration, BlipProcessor
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
            try:
                processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
                model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
            except (OSError, ValueError) as e:
                raise MuralistError(f"cannot load the captioning model in {folder}: {str(e).splitlines()[0]}") from None
            return processor, model

        with self._lock:  # one caption at a time: the model is shared
            # One BLIP at a time, as before: another folder or a replaced file frees the old one.
            self.manager.discard("blip", lambda k: k != key)
            with self.manager.use("blip", key, load, file_bytes(folder), f"BLIP ({folder.name})") as (processor, model):
                inputs = processor(images=image.convert("RGB"), return_tensors="pt")
                with torch.inference_mode():
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
                return processor.decode(out[0], skip_special_tokens=True).strip()
