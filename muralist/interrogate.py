"""Image captioning ("interrogate") with a BLIP model from a local folder, never a hub.

A1111's "CLIP" interrogator captions with BLIP and then appends CLIP-ranked artist/flavour
terms; muralist returns the BLIP caption (the ranking needs open_clip and its hub data).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import MuralistError
from .paths import DataDirs


class Interrogator:
    def __init__(self, dirs: DataDirs) -> None:
        self.folder = dirs.root / "models" / "BLIP"
        self._loaded: tuple[Path, Any, Any] | None = None
        self._lock = threading.Lock()

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
        from transformers import BlipForConditionalGeneration, BlipProcessor
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        folder = self.model_dir()
        with self._lock:  # one caption at a time: the model is shared
            if self._loaded is None or self._loaded[0] != folder:
                try:
                    processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
                    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
                except (OSError, ValueError) as e:
                    raise MuralistError(f"cannot load the captioning model in {folder}: {str(e).splitlines()[0]}") from None
                self._loaded = (folder, processor, model)
            _, processor, model = self._loaded
            inputs = processor(images=image.convert("RGB"), return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens)
            return processor.decode(out[0], skip_special_tokens=True).strip()
