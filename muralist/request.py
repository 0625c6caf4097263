"""The one request model every entry point builds (CLI, native API, A1111 API, web UI).

Field names are A1111's, so an A1111 client's JSON maps onto it directly. A request carries
everything its job needs — model, VAE, sampler, seeds — so no global setting can change it after
it was made. Unknown fields are ignored, as A1111's API does (clients send legacy ones).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .controlnet.units import ControlNetUnit
from .errors import InvalidRequestError

MAX_SIDE = 4096


class GenerationRequest(BaseModel):
    """A txt2img request with A1111's field names and API defaults (where the CLI differs it says so)."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1: random")
    subseed: int = Field(-1, ge=-1, le=2**32 - 1, description="variation seed; -1: random")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = Field(-1, ge=-1, le=MAX_SIDE)
    seed_resize_from_w: int = Field(-1, ge=-1, le=MAX_SIDE)
    sampler_name: str | None = Field(None, description="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M'")
    scheduler: str | None = Field(None, description="schedule type, e.g. 'Automatic', 'Karras'")
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=100, description="batch count")
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=64, le=MAX_SIDE)
    height: int = Field(512, ge=64, le=MAX_SIDE)
    clip_skip: int = Field(1, ge=1, le=12)
    tiling: bool = False
    novelai_braces: bool = Field(False, description="read NovelAI-style {x} as emphasis x1.05 (muralist setting)")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="ancestral noise (A1111's eta_ancestral; Euler a)")
    s_noise: float | None = Field(None, ge=0.0, le=2.0, description="scale of the ancestral/SDE noise (A1111's s_noise)")
    s_churn: float | None = Field(None, ge=0.0, le=100.0, description="Euler/Heun/DPM2 noise re-injection (A1111's s_churn)")
    s_tmin: float | None = Field(None, ge=0.0, le=100.0, description="lowest sigma that gets s_churn (A1111's s_tmin)")
    s_tmax: float | None = Field(None, ge=0.0, le=1000.0, description="highest sigma that gets s_churn; 0: no limit (A1111)")
    sgm_noise_multiplier: bool = Field(False, description="scale the initial noise as SGM does (A1111's option)")
    sigma_min: float = Field(0.0, ge=0.0, le=1000.0, description="schedule's lowest sigma; 0: the model's (A1111)")
    sigma_max: float = Field(0.0, ge=0.0, le=1000.0, description="schedule's highest sigma; 0: the model's (A1111)")
    rho: float = Field(0.0, ge=0.0, le=100.0, description="Karras/Polyexponential rho; 0: the schedule's default")
    always_discard_next_to_last_sigma: bool = Field(False, description="drop the next-to-last sigma (A1111's option)")
    beta_dist_alpha: float = Field(0.6, gt=0.0, le=10.0, description="Beta schedule's alpha (A1111's option)")
    beta_dist_beta: float = Field(0.6, gt=0.0, le=10.0, description="Beta schedule's beta (A1111's option)")
    pad_cond_uncond: bool = Field(False, description="pad prompt and negative prompt to the same length (A1111's option)")
    emphasis: Literal["Original", "No norm", "Ignore", "None"] = Field(
        "Original", description="how (word:1.2) weights apply (A1111's option; None: brackets are plain text)")
    # img2img / inpainting (A1111 field names and API defaults)
    init_images: list[str] = Field(default_factory=list, description="img2img: base64 images (raw or data URLs)")
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale")
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0, description="img2img default 0.75, hires fix 0.7")
    mask: str | None = Field(None, description="inpainting mask, base64; white = repaint")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3, description="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="inpaint area: True only masked, False whole picture")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    # outpainting (muralist's form of A1111's outpainting scripts): extend the canvas of init_images[0]
    outpaint_left: int = Field(0, ge=0, le=2048)
    outpaint_right: int = Field(0, ge=0, le=2048)
    outpaint_top: int = Field(0, ge=0, le=2048)
    outpaint_bottom: int = Field(0, ge=0, le=2048)
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=4.0)
    hr_upscaler: str | None = Field(None, description="Latent (...) mode, None, Lanczos, Nearest or a model upscaler")
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE)
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_checkpoint_name: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # A1111 scripts: "X/Y/Z plot" and "Prompt matrix", with A1111's positional script_args
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    # A1111 options that change a job's output. They travel with the job (from the caller's
    # /sdapi/v1/options, override_settings or the request itself), never from a global setting.
    eta_noise_seed_delta: int = Field(0, ge=0, le=2**32 - 1, description="A1111's ENSD: reseed step noise with seed + delta")
    randn_source: str = Field("CPU", description="noise source: CPU (same image on every device) or GPU (the worker's device)")
    img2img_fix_steps: bool = Field(False, description="img2img: run exactly `steps` steps (A1111's option)")
    upscaler_for_img2img: str | None = Field(None, description="upscaler for enlarging img2img inputs; None: Lanczos")
    samples_format: str = Field("png", description="png, jpg or webp (infotext in PNG text / EXIF UserComment)")
    jpeg_quality: int = Field(80, ge=1, le=100)
    webp_lossless: bool = False
    controlnet: list[ControlNetUnit] = Field(default_factory=list, description="ControlNet units (sd-webui-controlnet's fields)")
    model: str | None = Field(None, description="checkpoint title, name or hash; None: the default")
    vae: str | None = Field(None, description="VAE file name; None/'Automatic': the checkpoint's own")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}; try {v - v % 8} or {v - v % 8 + 8})")
        return v

    @field_validator("randn_source")
    @classmethod
    def _randn_source(cls, v: str) -> str:
        key = v.strip().upper()
        if key == "NV":
            raise ValueError("NV (NVIDIA's Philox on the CPU) is not available in muralist; use CPU or GPU")
        if key not in ("CPU", "GPU"):
            raise ValueError(f"must be CPU or GPU, not {v!r}")
        return key

    @field_validator("samples_format")
    @classmethod
    def _samples_format(cls, v: str) -> str:
        key = v.strip().lower().lstrip(".")
        key = "jpg" if key == "jpeg" else key
        if key not in ("png", "jpg", "webp"):
            raise ValueError(f"must be png, jpg or webp, not {v!r}")
        return key

    @field_validator("vae")
    @classmethod
    def _vae_auto(cls, v: str | None) -> str | None:
        # A1111's sd_vae values that mean "the checkpoint's own VAE".
        return None if v is None or v.strip() in ("", "Automatic", "None") else v

    @property
    def control_units(self) -> list[ControlNetUnit]:
        """The units that take part (enabled, with a model)."""
        return [u for u in self.controlnet if u.active]

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def outpaints(self) -> bool:
        return any((self.outpaint_left, self.outpaint_right, self.outpaint_top, self.outpaint_bottom))

    @property
    def hr_size(self) -> tuple[int, int]:
        """The hires-fix target size (A1111: a given resize wins, one side keeps the aspect ratio)."""
        w, h = self.width, self.height
        if self.hr_resize_x and self.hr_resize_y:
            return self.hr_resize_x // 8 * 8, self.hr_resize_y // 8 * 8
        if self.hr_resize_x:
            return self.hr_resize_x // 8 * 8, int(h * self.hr_resize_x / w) // 8 * 8
        if self.hr_resize_y:
            return int(w * self.hr_resize_y / h) // 8 * 8, self.hr_resize_y // 8 * 8
        return int(w * self.hr_scale) // 8 * 8, int(h * self.hr_scale) // 8 * 8


M = TypeVar("M", bound=BaseModel)


def checked(model: type[M], data: Any, prefix: str = "") -> M:
    """``model`` validated from ``data``; errors name the field and the rule (``InvalidRequestError``)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidRequestError(prefix + describe_validation_error(e)) from None


def parse_request(data: dict[str, Any]) -> GenerationRequest:
    """Validate a request; errors name the field and the rule (``InvalidRequestError``)."""
    return checked(GenerationRequest, data)


def describe_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}")
    return "; ".join(parts)
