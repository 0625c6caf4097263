"""Typed bodies of AUTOMATIC1111's ``/sdapi/v1`` routes: A1111's field names, types and API defaults.

They make ``/docs`` and ``/openapi.json`` describe what A1111 clients send, so clients can be
generated, and wrong types are a 422 naming the field before anything is queued. Ranges and
meaning are checked once, by the one request model (``muralist.request``), so these declare types
only. Unknown fields are kept and then ignored, as A1111 does (clients still send legacy fields
such as ``firstphase_width``, and extensions add their own).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    def sent(self) -> dict[str, Any]:
        """The fields the client actually sent (unknown ones included), as our request fields expect."""
        return self.model_dump(exclude_unset=True)


class _Generation(_Body):
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(
        None, description="A1111 option names and values for this job only (never a global switch)")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    sampler_index: str = Field("Euler", description="legacy name of sampler_name")
    script_name: str | None = Field(None, description="'X/Y/Z plot', 'Prompt matrix' or (img2img) 'SD upscale'")
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = Field(None, description="the job id to use (a new, unused id)")
    infotext: str | None = None
    # muralist's own fields (per-job model and VAE, clip skip, outpainting); A1111 clients never send them.
    model: str | None = Field(None, description="muralist: checkpoint title, name or hash for this job")
    vae: str | None = Field(None, description="muralist: VAE file name for this job")
    clip_skip: int | None = Field(None, description="muralist: CLIP_stop_at_last_layers for this job")


class Txt2ImgRequest(_Generation):
    """``POST /sdapi/v1/txt2img`` (A1111's StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Generation):
    """``POST /sdapi/v1/img2img`` (A1111's StableDiffusionImg2ImgProcessingAPI)."""

    init_images: list[str] | None = Field(None, description="base64 images (raw or data URLs)")
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 mask; white = repaint")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    outpaint_left: int | None = Field(None, description="muralist: pixels to add on the left (outpainting)")
    outpaint_right: int | None = None
    outpaint_top: int | None = None
    outpaint_bottom: int | None = None


class GenerationResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] = Field(description="base64 images in the job's samples_format (PNG by default)")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seeds, infotexts, model, warnings...")


class _Extras(_Body):
    resize_mode: int = Field(0, description="0 scale by upscaling_resize, 1 scale to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleRequest(_Extras):
    image: str = Field("", description="base64 image")


class FileData(BaseModel):
    data: str = Field(description="base64 image")
    name: str = ""


class ExtrasBatchRequest(_Extras):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 (A1111's name)

    def sent(self) -> dict[str, Any]:
        out = super().sent()
        if "imageList" in out:
            out["imageList"] = [{"data": f.data, "name": f.name} for f in self.imageList]
        return out


class ExtrasSingleResponse(BaseModel):
    image: str | None
    html_info: str


class ExtrasBatchResponse(BaseModel):
    images: list[str]
    html_info: str


class PngInfoRequest(BaseModel):
    image: str = Field(description="base64 PNG/JPEG/WEBP")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class InterrogateRequest(BaseModel):
    image: str = Field("", description="base64 image")
    model: str = "clip"


class InterrogateResponse(BaseModel):
    caption: str


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class ProgressRequest(BaseModel):
    """``POST /internal/progress`` (the A1111 web page's poll)."""

    model_config = ConfigDict(extra="allow")

    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True
