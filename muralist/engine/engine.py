"""The engine: a request in, saved images out.

It resolves the request's model and VAE names through the registry, takes the loaded model from
its cache (loading it if needed), runs the generation and saves A1111-named PNGs carrying the
infotext. The request is the only input that varies between jobs: the engine keeps no "current
model" setting that one job could change for another.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..infotext import save_png
from ..models.loader import LoadedModel, load_checkpoint, load_vae
from ..models.manager import ModelManager, file_bytes
from ..models.registry import CheckpointInfo, ModelRegistry, VaeInfo
from ..networks.lora import LoraRegistry
from ..paths import DataDirs
from ..prompts.embeddings import EmbeddingRegistry
from ..prompts.parser import extract_extra_networks, lora_multipliers
from ..prompts.styles import apply_styles, find_style, load_styles
from ..request import GenerationRequest
from .txt2img import Extras, GenerationResult, Identity, JobControl, ProgressFn, generate_images

_NUMBERED = re.compile(r"^(\d+)-")


@dataclass
class SavedResult:
    result: GenerationResult
    paths: list[Path] = field(default_factory=list)
    model: CheckpointInfo | None = None
    vae: VaeInfo | None = None
    detected: list[Path] = field(default_factory=list)  # ControlNet maps, after the images


def outpaint_request(req: GenerationRequest) -> GenerationRequest:
    """An outpainting request as the inpainting request it is: extended canvas + mask of the new area."""
    from ..errors import InvalidRequestError
    from .images import decode_image, encode_png, outpaint_canvas

    if not req.init_images:
        raise InvalidRequestError("init_images: outpainting extends an image: send one")
    src = decode_image(req.init_images[0], "init_images[0]")
    canvas, mask = outpaint_canvas(src, req.outpaint_left, req.outpaint_right, req.outpaint_top, req.outpaint_bottom, req.mask_blur * 2)
    return req.model_copy(update={
        "init_images": [encode_png(canvas)], "mask": encode_png(mask), "width": canvas.width, "height": canvas.height,
        "inpaint_full_res": False, "resize_mode": 0, "outpaint_left": 0, "outpaint_right": 0, "outpaint_top": 0, "outpaint_bottom": 0,
        "denoising_strength": req.denoising_strength if req.denoising_strength is not None else 0.9,
    })


def next_sequence_number(folder: Path) -> int:
    """A1111's numbering: one more than the highest ``NNNNN-`` prefix in the folder."""
    highest = -1
    if folder.is_dir():
        for p in folder.iterdir():
            if m := _NUMBERED.match(p.name):
                highest = max(highest, int(m[1]))
    return highest + 1


def embedding_widths(model: LoadedModel) -> dict[str, int]:
    """Text-encoder widths keyed as embedding files name their vectors."""
    from .conditioning import encoder_keys

    return {vec: model.text_encoders[comp].config.hidden_size for comp, vec in encoder_keys(model.family)}


class ModelCache:
    """Loaded checkpoints and VAEs, a facade over the worker's ``ModelManager``.

    ``max_models``/``max_vaes`` cap the counts of each; ``max_bytes`` is the manager's budget,
    shared with every other kind of model (upscalers, face restorers, BLIP). A model in use by a
    job is pinned: it is never evicted under that job. Keyed by file path and content hash, so a
    replaced file is never served from a stale entry. Two jobs asking for the same unloaded model
    wait for one load.
    """

    def __init__(
        self,
        max_models: int = 1,
        max_vaes: int = 2,
        device: str | None = None,
        max_bytes: int | None = None,
        manager: ModelManager | None = None,
    ) -> None:
        if manager is None:
            manager = ModelManager(device, max_bytes)
        elif max_bytes is not None:
            manager.max_bytes = max_bytes
        self.manager = manager
        self.max_models = max_models
        self.max_vaes = max_vaes

    # The limits live in the manager, so changing them here changes what it enforces.
    @property
    def device(self) -> torch.device:
        return self.manager.device

    @property
    def max_models(self) -> int:
        return self.manager.max_count["checkpoint"]

    @max_models.setter
    def max_models(self, value: int) -> None:
        self.manager.max_count["checkpoint"] = value

    @property
    def max_vaes(self) -> int:
        return self.manager.max_count["vae"]

    @max_vaes.setter
    def max_vaes(self, value: int) -> None:
        self.manager.max_count["vae"] = value

    @property
    def max_bytes(self) -> int | None:
        return self.manager.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self.manager.max_bytes = value

    def _checkpoint(self, info: CheckpointInfo) -> tuple[tuple[str, str], Callable[[], LoadedModel], int, str]:
        def load() -> LoadedModel:
            return load_checkpoint(info.path, info.kind, info.prediction_type, str(self.device))

        return (str(info.path), info.sha256), load, file_bytes(info.path), info.title

    def model(self, info: CheckpointInfo) -> LoadedModel:
        """The loaded model (not pinned: use ``use()`` while running a job on it)."""
        key, load, estimate, label = self._checkpoint(info)
        return self.manager.get("checkpoint", key, load, estimate, label)

    @contextlib.contextmanager
    def use(self, info: CheckpointInfo) -> Iterator[LoadedModel]:
        """The loaded model, pinned for the duration of the block."""
        key, load, estimate, label = self._checkpoint(info)
        with self.manager.use("checkpoint", key, load, estimate, label) as model:
            yield model

    def vae(self, info: VaeInfo, model: LoadedModel) -> Any:
        key = (str(info.path), info.sha256, model.family.value)
        return self.manager.get("vae", key, lambda: load_vae(info.path, model.family, model.device),
                                file_bytes(info.path), info.name)

    def loaded(self) -> list[tuple[str, str]]:
        """``(path, sha256)`` of the loaded checkpoints, least recently used first."""
        return [key for _kind, key in self.manager.loaded("checkpoint")]  # type: ignore[misc]


class Engine:
    """Runs generation requests against the models of one data folder."""

    def __init__(
        self,
        dirs: DataDirs | None = None,
        registry: ModelRegistry | None = None,
        cache: ModelCache | None = None,
        device: str | None = None,
    ) -> None:
        self.dirs = dirs or DataDirs.from_options()
        self.registry = registry or ModelRegistry(self.dirs)
        self.cache = cache or ModelCache(device=device)
        self.loras = LoraRegistry(self.dirs, self.registry.cache)
        self.embeddings = EmbeddingRegistry(self.dirs, self.registry.cache)
        from ..interrogate import Interrogator
        from ..upscale.faces import FaceRestorers
        from ..upscale.upscalers import UpscalerRegistry

        # Every kind of model shares the cache's manager: one budget for the whole worker.
        manager = self.cache.manager
        self.upscalers = UpscalerRegistry(self.dirs, manager=manager)
        self.faces = FaceRestorers(self.dirs, device=str(self.cache.device), manager=manager)
        self.interrogator = Interrogator(self.dirs, manager=manager)
        from ..controlnet.models import ControlNetRegistry

        self.controlnets = ControlNetRegistry(self.dirs)

    @property
    def styles_file(self) -> Path:
        return self.dirs.root / "styles.csv"

    def apply_styles(self, req: GenerationRequest) -> GenerationRequest:
        """The request with its named styles (A1111's styles.csv) applied to the prompts."""
        if not req.styles:
            return req
        table = load_styles(self.styles_file)
        styles = [find_style(table, name) for name in req.styles]
        prompt, negative = apply_styles(req.prompt, req.negative_prompt, styles)
        return req.model_copy(update={"prompt": prompt, "negative_prompt": negative})

    def extras_for(self, prompt: str, model: LoadedModel) -> tuple[Extras, list[str]]:
        """The LoRAs a prompt's tags ask for and the embeddings usable with ``model``, plus warnings.

        An unknown LoRA is reported with the closest names instead of failing the job, as A1111 does.
        """
        extras, warnings = Extras(), []
        _, nets = extract_extra_networks(prompt)
        for net in nets:
            if net.kind != "lora":
                warnings.append(f"extra network <{net.describe()}> is not supported and was ignored")
                continue
            name = net.items[0] if net.items else ""
            info = self.loras.find(name)
            if info is None:
                near = self.loras.suggest(name)
                hint = f"; did you mean: {', '.join(near)}" if near else f" (no LoRA in {self.dirs.lora_dir})"
                warnings.append(f"LoRA {name!r} not found{hint}")
                continue
            te, unet = lora_multipliers(net)
            extras.loras.append((info, te, unet))
        extras.embeddings, _skipped = self.embeddings.for_model(embedding_widths(model))
        return extras, warnings

    def upscale(self, image: Any, width: int, height: int, upscaler: str) -> Any:
        """Resize an image to exactly ``width`` x ``height`` with a named (non-latent) upscaler."""
        from ..upscale.upscalers import upscale

        return upscale(image, upscaler, self.upscalers, target=(width, height), device=self.cache.device)

    def script(self, req: GenerationRequest) -> tuple[str, Any]:
        """The request's A1111 script ("xyz" with its validated spec, or "matrix"), checked before any work."""
        from ..errors import InvalidRequestError
        from ..scripts.grids import plan_xyz, xyz_from_script_args

        name = (req.script_name or "").strip().lower()
        base = req.model_copy(update={"script_name": None, "script_args": [], "styles": []})
        if name in ("x/y/z plot", "xyz plot", "x/y/z", "xyz", "x/y plot"):
            spec = xyz_from_script_args(req.script_args, img2img=bool(req.init_images))
            plan_xyz(self, base, spec)
            return "xyz", spec
        if name == "sd upscale":
            if not req.init_images:
                raise InvalidRequestError("init_images: SD upscale is an img2img script: send the image to upscale")
            args = list(req.script_args) + [None] * 4
            upscaler = args[2]
            if isinstance(upscaler, int) and not isinstance(upscaler, bool):  # A1111's UI sends an index
                names = self.upscalers.names()
                if not 0 <= upscaler < len(names):
                    raise InvalidRequestError(
                        f"script_args[2]: upscaler index {upscaler} is out of range; there are {len(names)}: {', '.join(names)}")
                upscaler = names[upscaler]
            elif upscaler is None:
                upscaler = "Lanczos"
            elif not isinstance(upscaler, str):
                raise InvalidRequestError("script_args[2]: the upscaler, as a name or an index into /sdapi/v1/upscalers")
            self.upscalers.find(upscaler)
            return "sd_upscale", (int(args[1] if args[1] is not None else 64), upscaler, float(args[3] if args[3] is not None else 2.0))
        if name == "prompt matrix":
            if "|" not in req.prompt:
                raise InvalidRequestError("prompt: the prompt matrix needs parts separated by | (e.g. 'a cat|red|hat')")
            return "matrix", None
        raise InvalidRequestError(
            f"script_name: {req.script_name!r} is not available; muralist has 'X/Y/Z plot', 'Prompt matrix' and 'SD upscale'"
        )

    def run_script(self, req: GenerationRequest, control: JobControl | None, progress: ProgressFn | None,
                   save_to: Path | None) -> SavedResult:
        """Run an A1111 script; the grids come first in the result, then the individual images (A1111)."""
        from ..scripts.grids import run_prompt_matrix, run_xyz

        kind, spec = self.script(req)
        base = req.model_copy(update={"script_name": None, "script_args": [], "styles": []})
        folder = save_to or self.dirs.outputs_dir / ("img2img-images" if req.init_images else "txt2img-images") / date.today().isoformat()
        if kind == "sd_upscale":
            from ..infotext import save_png
            from ..scripts.sd_upscale import sd_upscale

            overlap, upscaler, scale = spec
            image, texts = sd_upscale(self, base, overlap, upscaler, scale, control, progress, folder)
            text = texts[0] + f", SD upscale overlap: {overlap}, SD upscale upscaler: {upscaler}" if texts else ""
            path = save_png(image, folder / f"{next_sequence_number(folder):05d}-upscaled.png", text)
            seed = base.seed
            result = GenerationResult([image], [text], [seed], [-1], base.sampler_name or "Euler", "")
            return SavedResult(result, [path], self.resolve_model(base), None)
        if kind == "xyz":
            out = run_xyz(self, base, spec, control, progress, save_to=folder, grid_dir=folder)
        else:
            # A1111's order: put_at_start, different_seeds, prompt_type, variations_delimiter, margin_size.
            args = list(req.script_args) + [None] * 5
            out = run_prompt_matrix(self, base, save_to=folder, control=control, progress=progress,
                                    put_at_start=bool(args[0]), different_seeds=bool(args[1]),
                                    prompt_type=str(args[2] or "positive"), variations_delimiter=str(args[3] or "comma"),
                                    margin_size=int(args[4] or 0), grid_dir=folder)
        choice_sampler = base.sampler_name or "Euler"
        result = GenerationResult(list(out.grids) + list(out.images), list(out.grid_infotexts) + list(out.infotexts),
                                  [out.seeds[0] if out.seeds else -1] * len(out.grids) + list(out.seeds),
                                  [-1] * (len(out.grids) + len(out.images)), choice_sampler, "", list(out.warnings))
        return SavedResult(result, list(out.grid_paths) + list(out.paths), self.resolve_model(base), None)

    def check_upscaler(self, req: GenerationRequest) -> None:
        """Hires fix's and img2img's upscaler names must exist before any work starts."""
        from ..errors import InvalidRequestError, NotFoundError
        from .txt2img import LATENT_MODES

        if req.enable_hr and (req.hr_upscaler or "Latent") not in LATENT_MODES:
            try:
                self.upscalers.find(req.hr_upscaler)
            except NotFoundError as e:
                raise InvalidRequestError(f"hr_upscaler: {e}; latent modes: {', '.join(LATENT_MODES)}") from None
        if req.init_images and req.upscaler_for_img2img not in (None, "", "None", "Lanczos"):
            try:
                self.upscalers.find(req.upscaler_for_img2img)
            except NotFoundError as e:
                raise InvalidRequestError(f"upscaler_for_img2img: {e}") from None

    def check_controlnet(self, req: GenerationRequest) -> GenerationRequest:
        """Every active unit's model, module and image must be usable before any work starts; returns
        the request with each unit's model pinned to its title ("name [hash]")."""
        from ..controlnet import preprocess
        from ..errors import InvalidRequestError
        from .images import decode_image

        units = list(req.controlnet)
        for i, u in enumerate(units):
            if not u.active:
                continue
            try:
                units[i] = u.model_copy(update={"model": self.controlnets.find(u.model).title})
                pre = preprocess.find(u.module)
                if pre.run is None:
                    preprocess.run(pre, None, 0, 0, 0, annotator_dir=self.dirs.controlnet_dir / "annotator")
                if u.image is None and not req.init_images:
                    raise InvalidRequestError("no image given: send the unit's 'image' (base64), or use img2img, "
                                              "whose init image a unit without an image takes")
                if u.image is not None:
                    decode_image(u.image, "image")
                if u.mask is not None:
                    decode_image(u.mask, "mask")
            except InvalidRequestError as e:
                raise InvalidRequestError(f"controlnet unit {i}: {e}") from None
        return req.model_copy(update={"controlnet": units}) if units else req

    @contextlib.contextmanager
    def controls(self, req: GenerationRequest, model: LoadedModel) -> Iterator[list[Any]]:
        """The job's active ControlNet units with their models loaded (pinned while the job runs)."""
        from ..controlnet import preprocess
        from ..controlnet.apply import Control
        from ..controlnet.models import load_controlnet
        from ..errors import InvalidRequestError
        from .images import decode_image

        out: list[Any] = []
        with contextlib.ExitStack() as stack:
            for i, u in enumerate(req.control_units):
                info = self.controlnets.find(u.model)
                family = model.family.value.upper()

                def load(path: Path = info.path, m: LoadedModel = model, fam: str = family) -> Any:
                    return load_controlnet(path, m.unet.config, fam, m.device, m.dtype)

                try:
                    cn = stack.enter_context(self.cache.manager.use(
                        "controlnet", (str(info.path), info.hash, family), load, file_bytes(info.path), info.title))
                except InvalidRequestError as e:
                    raise InvalidRequestError(f"controlnet unit {i}: {e}") from None
                src = np.asarray(decode_image(u.image, f"controlnet unit {i} image").convert("RGB")) if u.image else None
                mask = np.asarray(decode_image(u.mask, f"controlnet unit {i} mask").convert("L")) if u.mask else None
                out.append(Control(u.model_copy(update={"model": info.title}), cn, src, preprocess.find(u.module),
                                   mask, self.dirs.controlnet_dir / "annotator"))
            yield out

    def resolve_model(self, req: GenerationRequest) -> CheckpointInfo:
        return self.registry.find_checkpoint(req.model) if req.model else self.registry.default_checkpoint()

    def generate(
        self,
        req: GenerationRequest,
        control: JobControl | None = None,
        progress: ProgressFn | None = None,
        save_to: Path | None = None,
        on_saved: Callable[[Path], None] | None = None,
        detected_maps: bool = True,
    ) -> SavedResult:
        """Run a request (txt2img, img2img, inpainting, outpainting or a script) and save its images
        (in ``save_to`` or A1111's dated outputs folder), then ControlNet's detected maps unless
        ``detected_maps`` is False (scripts' cells and tiles)."""
        req = self.apply_styles(req)
        if req.script_name:
            return self.run_script(req, control, progress, save_to)
        self.check_upscaler(req)
        if req.outpaints:
            req = outpaint_request(req)
        info = self.resolve_model(req)
        vae_info = self.registry.find_vae(req.vae) if req.vae else None
        with self.cache.use(info) as model, self.controls(req, model) as controls:
            vae = self.cache.vae(vae_info, model) if vae_info else None
            extras, warnings = self.extras_for(req.prompt, model)
            result = generate_images(
                model,
                req,
                Identity(info.model_name, info.shorthash),
                vae,
                Identity(vae_info.name, vae_info.shorthash) if vae_info else None,
                control,
                progress,
                extras,
                self.upscale,
                controls,
            )
        result.warnings[:0] = warnings
        kind = "img2img-images" if req.init_images else "txt2img-images"
        folder = save_to or self.dirs.outputs_dir / kind / date.today().isoformat()
        saved = SavedResult(result, [], info, vae_info)
        number = next_sequence_number(folder)
        for i, (img, text, seed) in enumerate(zip(result.images, result.infotexts, result.seeds, strict=True)):
            path = save_png(img, folder / f"{number + i:05d}-{seed}.png", text)
            saved.paths.append(path)
            if on_saved is not None:
                on_saved(path)
        if detected_maps:  # ControlNet's detected maps come after the images, as the extension returns them
            number += len(result.images)
            for i, img in enumerate(result.detected):
                saved.detected.append(save_png(img, folder / f"{number + i:05d}-detected.png", ""))
        return saved
