"""The ``muralist`` command line.

Every subcommand builds the same ``GenerationRequest`` the APIs build; user errors print one
line and exit with code 2, never a traceback. Heavy imports (torch, diffusers) happen inside
the commands that need them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .envflags import env_epilog


def _add_dirs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("folders (A1111 layout)")
    g.add_argument("--data-dir", help="data folder (default: ./data or $MURALIST_DATA_DIR)")
    g.add_argument("--ckpt-dir", help="checkpoints folder (default: DATA/models/Stable-diffusion)")
    g.add_argument("--vae-dir", help="VAE folder (default: DATA/models/VAE)")
    g.add_argument("--lora-dir", help="LoRA folder (default: DATA/models/Lora)")
    g.add_argument("--embeddings-dir", help="embeddings folder (default: DATA/embeddings)")
    g.add_argument("--controlnet-dir", help="ControlNet models folder (default: DATA/models/ControlNet)")


def _dirs(args: argparse.Namespace) -> Any:
    from .paths import DataDirs

    return DataDirs.from_options(args.data_dir, args.ckpt_dir, args.vae_dir, args.lora_dir, args.embeddings_dir,
                                 controlnet_dir=args.controlnet_dir)


def _add_download_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("downloads (tokens only from the environment: HF_TOKEN, CIVITAI_API_TOKEN, MODELSCOPE_API_TOKEN)")
    g.add_argument("--hf-endpoint", help="Hugging Face endpoint or mirror, e.g. https://hf-mirror.com (default: $HF_ENDPOINT)")
    g.add_argument("--modelscope-endpoint", help="ModelScope endpoint (default: $MODELSCOPE_ENDPOINT or www.modelscope.cn)")
    g.add_argument("--civitai-endpoint", help="Civitai endpoint (default: $CIVITAI_ENDPOINT or civitai.com)")
    g.add_argument("--max-download-gb", type=float, default=None, help="size cap of one downloaded file (default 64)")


def _download_settings(args: argparse.Namespace) -> Any:
    from .models.download import DownloadSettings

    cap = int(args.max_download_gb * 2**30) if args.max_download_gb else None
    return DownloadSettings.from_env(hf_endpoint=args.hf_endpoint, modelscope_endpoint=args.modelscope_endpoint,
                                     civitai_endpoint=args.civitai_endpoint, max_bytes=cap)


def _add_log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per log line (ts, level, logger, message, job, user)")


# Commands whose options may also come from MURALIST_* variables (what container images set).
ENV_COMMANDS = ("serve", "worker", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muralist", description="Self-hosted Stable Diffusion with A1111 conventions.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="txt2img: generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--style", action="append", default=[], help="a style from DATA/styles.csv (repeatable)")
    g.add_argument("--model", help="checkpoint title, name or hash (default: the first checkpoint)")
    g.add_argument("--vae", help="VAE file name (default: the checkpoint's own)")
    g.add_argument("--sampler", default="Euler a", help="A1111 sampler name (default: Euler a)")
    g.add_argument("--scheduler", default=None, help="schedule type: Automatic, Karras, Exponential, SGM Uniform...")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg-scale", type=float, default=7.0)
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--subseed", type=int, default=-1, help="variation seed")
    g.add_argument("--subseed-strength", type=float, default=0.0, help="variation strength (0-1)")
    g.add_argument("--seed-resize-from", default=None, metavar="WxH", help="make the noise as if the size were WxH")
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--n-iter", type=int, default=1, help="batch count")
    g.add_argument("--clip-skip", type=int, default=1)
    g.add_argument("--tiling", action="store_true")
    g.add_argument("--eta", type=float, default=None)
    i2i = g.add_argument_group("img2img and inpainting")
    i2i.add_argument("--init-image", type=Path, action="append", default=[], help="img2img source image (repeatable)")
    i2i.add_argument("--denoising-strength", type=float, default=None)
    i2i.add_argument("--resize-mode", type=int, default=0, help="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent")
    i2i.add_argument("--mask", type=Path, default=None, help="inpainting mask (white = repaint)")
    i2i.add_argument("--mask-blur", type=int, default=4)
    i2i.add_argument("--inpainting-fill", type=int, default=1, help="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    i2i.add_argument("--whole-picture", action="store_true", help="inpaint area: whole picture (default: only masked)")
    i2i.add_argument("--padding", type=int, default=32, help="only-masked padding in pixels")
    i2i.add_argument("--invert-mask", action="store_true")
    hr = g.add_argument_group("hires fix")
    hr.add_argument("--hires", action="store_true", help="enable hires fix")
    hr.add_argument("--hr-scale", type=float, default=2.0)
    hr.add_argument("--hr-upscaler", default="Latent")
    hr.add_argument("--hr-steps", type=int, default=0, help="second-pass steps (0: same as --steps)")
    sc = g.add_argument_group("scripts")
    sc.add_argument("--script-name", default=None, help='"X/Y/Z plot", "Prompt matrix" or "SD upscale"')
    sc.add_argument("--script-args", default="[]", help="A1111's script_args as a JSON list")
    g.add_argument("--out", type=Path, default=None, help="folder for the images (default: DATA/outputs/txt2img-images/DATE)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_dirs(g)

    m = sub.add_parser("models", help="list, create or merge models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="list checkpoints: title, family, hash, size")
    _add_dirs(ml)
    mt = msub.add_parser("make-tiny", help="write tiny random-weight SD1/SD2/SDXL models (for trying muralist out)")
    _add_dirs(mt)
    mm = msub.add_parser("merge", help="merge checkpoints as A1111's Checkpoint Merger; the result goes to the checkpoint folder")
    mm.add_argument("--primary", required=True, help="model A (title, name or hash)")
    mm.add_argument("--secondary", help="model B (not needed for no_interpolation)")
    mm.add_argument("--tertiary", help="model C (add_difference: A + (B - C) x M)")
    mm.add_argument("--method", default="weighted_sum", help="weighted_sum (default), add_difference or no_interpolation")
    mm.add_argument("--multiplier", type=float, default=0.3, help="M (default 0.3)")
    mm.add_argument("--save-as-half", action="store_true", help="store float32 tensors as float16")
    mm.add_argument("--bake-in-vae", help="a VAE from the VAE folder to replace the model's own")
    mm.add_argument("--discard-weights", default="", help="drop keys matching this regular expression")
    mm.add_argument("--name", default="", help="output name without extension (default: A1111's name for the merge)")
    mm.add_argument("--format", dest="save_as", choices=("safetensors", "ckpt"), default="safetensors")
    mm.add_argument("--no-copy-metadata", action="store_true", help="do not copy the inputs' safetensors metadata")
    _add_dirs(mm)
    md = msub.add_parser("download", help="download a model into its A1111 folder (resumable, sha256-verified)")
    md.add_argument("--source", required=True, choices=("hf", "modelscope", "civitai", "url"))
    md.add_argument("--repo", help="hf: repository id (owner/name)")
    md.add_argument("--model-id", help="modelscope: model id (owner/name)")
    md.add_argument("--version-id", help="civitai: model version id")
    md.add_argument("--url", help="url: the file's http(s) URL")
    md.add_argument("--file", help="the file's path in the repository (civitai: which file of the version)")
    md.add_argument("--revision", help="branch, tag or commit (hf: main, modelscope: master)")
    md.add_argument("--kind", default="checkpoint",
                    help="checkpoint, vae, lora, embedding, controlnet, upscaler or hypernetwork (picks the folder)")
    md.add_argument("--name", help="file name to save as (default: the source's)")
    md.add_argument("--sha256", help="expected sha256 (checked in addition to what the source publishes)")
    md.add_argument("--fallback", action="append", default=[], metavar="SOURCE:ID[:FILE]",
                    help="another source of the same file, tried if this one fails, e.g. modelscope:owner/name")
    _add_download_options(md)
    _add_dirs(md)
    mi = msub.add_parser("info", help="fetch model cards from Civitai (by hash): preview, trigger words, base model")
    mi.add_argument("name", nargs="?", help="the model (title, name or file); omit with --all")
    mi.add_argument("--kind", default="checkpoint", help="checkpoint, vae, lora, embedding, controlnet, upscaler, ...")
    mi.add_argument("--all", action="store_true", help="every model that has no card yet")
    mi.add_argument("--refresh", action="store_true", help="fetch again, replacing cards and previews")
    _add_download_options(mi)
    _add_dirs(mi)

    sv = sub.add_parser("serve", help="run the HTTP service (native /api/v1 and A1111 /sdapi/v1)",
                        epilog=env_epilog("serve") + " First admin: MURALIST_ADMIN_KEY (24+ characters) and "
                        "MURALIST_ADMIN_NAME (default admin) create that admin if it does not exist.")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--listen", action="store_true", help="listen on all interfaces (0.0.0.0); needs authentication "
                    "(with no users yet, the first start creates user admin and prints its key once)")
    sv.add_argument("--allow-anonymous", action="store_true", help="allow --listen without any authentication")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--database", default=None, help="sqlite:///path or postgresql://... (default: DATA/muralist.db)")
    sv.add_argument("--api-auth", default=None, metavar="USER:PASS,...", help="HTTP Basic users (A1111's flag)")
    sv.add_argument("--workers", type=int, default=None, help="in-process workers (default: one per GPU, one on CPU)")
    sv.add_argument("--device", default=None)
    sv.add_argument("--max-loaded-models", type=int, default=2, help="checkpoints kept loaded (model cache size)")
    sv.add_argument("--max-model-memory", type=float, default=None, metavar="GIB",
                    help="memory budget of the loaded checkpoints' weights (RAM on CPU, VRAM on GPU)")
    sv.add_argument("--cors-allow-origins", default=None, help="comma-separated origins")
    sv.add_argument("--keep-days", type=float, default=30.0, help="prune finished jobs and their images after N days (0: keep all)")
    sv.add_argument("--devices", default=None, metavar="cuda:0,cuda:1|cpu",
                    help="in-process workers, one per device (default: each GPU, else the CPU)")
    sv.add_argument("--cluster", default=None, metavar="HOST:PORT",
                    help="run jobs on the worker actors of this Ray cluster (see 'muralist worker')")
    sv.add_argument("--stall-timeout", type=float, default=300.0, metavar="S",
                    help="kill a worker that reports no progress for S seconds and re-run its job")
    sv.add_argument("--lease-timeout", type=float, default=20.0, metavar="S",
                    help="a running job whose API process is silent for S seconds is re-queued by another")
    sv.add_argument("--max-attempts", type=int, default=2, help="lost runs (dead or stalled worker) before a job fails")
    sv.add_argument("--grace", type=float, default=10.0, metavar="S",
                    help="on SIGTERM, seconds running jobs get to finish before they are re-queued")
    sv.add_argument("--metrics-public", action="store_true",
                    help="serve /metrics without an admin API key (for a private scrape network)")
    _add_log_format(sv)
    _add_download_options(sv)
    _add_dirs(sv)

    wk = sub.add_parser("worker", help="offer this machine's devices to a cluster's API (Ray)", epilog=env_epilog("worker"))
    wk.add_argument("--cluster", required=True, metavar="HOST:PORT", help="the Ray head (muralist cluster start-head)")
    wk.add_argument("--devices", default=None, metavar="cuda:0,cuda:1|cpu", help="default: every GPU, else the CPU")
    wk.add_argument("--name", default=None, help="worker name (default: this machine's host name)")
    wk.add_argument("--max-loaded-models", type=int, default=2)
    wk.add_argument("--max-model-memory", type=float, default=None, metavar="GIB")
    wk.add_argument("--no-start-node", action="store_true",
                    help="this machine already joined the cluster (ray start --address=...)")
    _add_log_format(wk)
    _add_dirs(wk)

    dc = sub.add_parser("doctor", help="check this machine and configuration before serving (GPU, database, models, disk, port)",
                        epilog=env_epilog("doctor"))
    dc.add_argument("--host", default="127.0.0.1")
    dc.add_argument("--listen", action="store_true", help="check the port on all interfaces (0.0.0.0)")
    dc.add_argument("--port", type=int, default=7860)
    dc.add_argument("--database", default=None, help="sqlite:///path or postgresql://... (default: DATA/muralist.db)")
    dc.add_argument("--cluster", default=None, metavar="HOST:PORT", help="check that this Ray head answers")
    dc.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    _add_dirs(dc)

    cl = sub.add_parser("cluster", help="Ray cluster set-up")
    clsub = cl.add_subparsers(dest="cluster_command", required=True)
    ch = clsub.add_parser("start-head", help="start the Ray head on this (the API) machine, with token auth")
    ch.add_argument("--port", type=int, default=6380, help="Ray's GCS port (default 6380; 6379 is Redis's)")
    ch.add_argument("--node-ip-address", default=None, help="the address the other machines reach this one at")

    us = sub.add_parser("users", help="manage users and API keys")
    usub = us.add_subparsers(dest="users_command", required=True)
    ua = usub.add_parser("add", help="create a user; prints the new API key alone on the last line")
    ua.add_argument("name")
    ua.add_argument("--admin", action="store_true")
    ul = usub.add_parser("list")
    ur = usub.add_parser("remove")
    ur.add_argument("name")
    uk = usub.add_parser("reset-key", help="replace a user's API key; prints the new key")
    uk.add_argument("name")
    um = usub.add_parser("limits", help="show or change a user's limits, e.g. max_downloads=1 (lets them download models)")
    um.add_argument("name")
    um.add_argument("changes", nargs="*", metavar="LIMIT=N", help="a whole number, or 'default' to drop the override")
    for p in (ua, ul, ur, uk, um):
        p.add_argument("--database", default=None)
        _add_dirs(p)

    ex = sub.add_parser("extras", help="upscale and/or restore faces in images (A1111's Extras)")
    ex.add_argument("images", type=Path, nargs="+")
    ex.add_argument("--upscaler", default="Lanczos", help="None, Lanczos, Nearest or a model in models/ESRGAN|RealESRGAN|SwinIR|DAT|HAT|ScuNET")
    ex.add_argument("--scale", type=float, default=2.0)
    ex.add_argument("--upscaler-2", default="None")
    ex.add_argument("--upscaler-2-visibility", type=float, default=0.0)
    ex.add_argument("--gfpgan", type=float, default=0.0, help="GFPGAN visibility (0-1)")
    ex.add_argument("--codeformer", type=float, default=0.0, help="CodeFormer visibility (0-1)")
    ex.add_argument("--codeformer-weight", type=float, default=0.5)
    ex.add_argument("--out", type=Path, default=None, help="folder (default: DATA/outputs/extras-images/DATE)")
    ex.add_argument("--device", default=None)
    _add_dirs(ex)

    pi = sub.add_parser("png-info", help="print the A1111 infotext stored in an image")
    pi.add_argument("file", type=Path)

    tr = sub.add_parser("train", help="train a LoRA on this machine (lora-scripts' options; the server queues trainings)")
    trsub = tr.add_subparsers(dest="train_command", required=True)
    tl = trsub.add_parser("lora", help="train a LoRA from a lora-scripts TOML; the file goes to models/Lora/")
    tl.add_argument("--config", type=Path, required=True, help="lora-scripts TOML (config/autosave/*.toml works as is)")
    tl.add_argument("--device", default=None)
    tl.add_argument("--resume", type=Path, default=None, help="a state file a stopped run left (<output>.state.pt)")
    _add_dirs(tl)
    return parser


def _seed_resize(value: str | None) -> tuple[int, int]:
    from .errors import InvalidRequestError

    if not value:
        return -1, -1
    try:
        w, h = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise InvalidRequestError(f"--seed-resize-from must look like 512x768, got {value!r}") from None
    return w, h


def _json_list(text: str) -> list[Any]:
    import json

    from .errors import InvalidRequestError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"--script-args must be a JSON list: {e}") from None
    if not isinstance(value, list):
        raise InvalidRequestError("--script-args must be a JSON list, e.g. '[\"Steps\", \"10,20\", \"\"]'")
    return value


def _b64_file(path: Path) -> str:
    import base64

    from .errors import MuralistError

    if not path.is_file():
        raise MuralistError(f"{path}: no such file")
    return base64.b64encode(path.read_bytes()).decode()


def cmd_generate(args: argparse.Namespace) -> int:
    from .request import parse_request

    w, h = _seed_resize(args.seed_resize_from)
    req = parse_request(
        {
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "styles": args.style,
            "model": args.model,
            "vae": args.vae,
            "sampler_name": args.sampler,
            "scheduler": args.scheduler,
            "steps": args.steps,
            "cfg_scale": args.cfg_scale,
            "seed": args.seed,
            "subseed": args.subseed,
            "subseed_strength": args.subseed_strength,
            "seed_resize_from_w": w,
            "seed_resize_from_h": h,
            "width": args.width,
            "height": args.height,
            "batch_size": args.batch_size,
            "n_iter": args.n_iter,
            "clip_skip": args.clip_skip,
            "tiling": args.tiling,
            "eta": args.eta,
            "init_images": [_b64_file(p) for p in args.init_image],
            "mask": _b64_file(args.mask) if args.mask else None,
            "denoising_strength": args.denoising_strength,
            "resize_mode": args.resize_mode,
            "mask_blur": args.mask_blur,
            "inpainting_fill": args.inpainting_fill,
            "inpaint_full_res": not args.whole_picture,
            "inpaint_full_res_padding": args.padding,
            "inpainting_mask_invert": int(args.invert_mask),
            "enable_hr": args.hires,
            "hr_scale": args.hr_scale,
            "hr_upscaler": args.hr_upscaler,
            "hr_second_pass_steps": args.hr_steps,
            "script_name": args.script_name,
            "script_args": _json_list(args.script_args),
        }
    )
    from .engine import samplers

    samplers.resolve(req.sampler_name, req.scheduler)  # fail on a bad name before loading anything
    from tqdm import tqdm

    from .engine.engine import Engine

    engine = Engine(_dirs(args), device=args.device)
    bars: list[Any] = []  # created at the first step, so errors before sampling print alone

    def progress(p: Any) -> None:
        if args.quiet:
            return
        if not bars:
            bars.append(tqdm(total=req.steps * req.n_iter, unit="step", file=sys.stderr, leave=False))
        bars[0].n = p.batch * p.steps + p.step
        bars[0].refresh()

    try:
        saved = engine.generate(req, progress=progress, save_to=args.out)
    finally:
        for bar in bars:
            bar.close()
    for path in saved.paths:
        print(path)
    for w_ in saved.result.warnings:  # e.g. an unknown LoRA name, with the closest names
        print(f"warning: {w_}", file=sys.stderr)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from .models.registry import ModelRegistry

    dirs = _dirs(args)
    reg = ModelRegistry(dirs)
    ckpts = reg.checkpoints()
    if not ckpts:
        print(f"no checkpoints in {dirs.ckpt_dir} (put .safetensors/.ckpt files there)", file=sys.stderr)
    rows = [(c.title, c.kind.label, c.shorthash, f"{c.size / 2**20:.1f} MiB") for c in ckpts]
    widths = [max([len(r[i]) for r in rows] + [len(h)]) for i, h in enumerate(("TITLE", "FAMILY", "HASH", "SIZE"))]
    if rows:
        print("  ".join(h.ljust(w) for h, w in zip(("TITLE", "FAMILY", "HASH", "SIZE"), widths, strict=True)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for path, why in reg.skipped():
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .models.tiny import make_tiny_models

    dirs = _dirs(args)
    for p in make_tiny_models(dirs.ckpt_dir, dirs.vae_dir, dirs.controlnet_dir):
        print(p)
    return 0


def cmd_models_merge(args: argparse.Namespace) -> int:
    from .models.merge import check_params, run_merge
    from .models.registry import ModelRegistry

    registry = ModelRegistry(_dirs(args))
    params = {"primary": args.primary, "secondary": args.secondary, "tertiary": args.tertiary, "method": args.method,
              "multiplier": args.multiplier, "save_as_half": args.save_as_half, "bake_in_vae": args.bake_in_vae,
              "discard_weights": args.discard_weights, "name": args.name, "save_as": args.save_as,
              "copy_metadata": not args.no_copy_metadata}
    shown = [-1]

    def progress(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct // 10 != shown[0] // 10 or done == total:
            shown[0] = pct
            print(f"merging: {done}/{total} keys", file=sys.stderr)

    result, info = run_merge(registry, check_params(registry, params), progress)
    print(f"{info.title}  {info.kind.label}  {result.path}")
def _fallback_ref(text: str, file: str | None) -> dict[str, Any]:
    from .errors import InvalidRequestError

    source, _, rest = text.partition(":")
    ident, _, alt_file = rest.partition(":")
    key = {"hf": "repo", "modelscope": "model_id", "civitai": "version_id", "url": "url"}.get(source)
    if key is None or not ident:
        raise InvalidRequestError(f"--fallback: {text!r} is not SOURCE:ID[:FILE] (sources: hf, modelscope, civitai, url)")
    if source == "url":
        return {"source": "url", "url": rest}
    return {"source": source, key: ident, **({"file": alt_file or file} if alt_file or file else {})}


def cmd_models_download(args: argparse.Namespace) -> int:
    """Download in this process (no server needed); Ctrl-C keeps the .part file, a rerun resumes it."""
    from .models.download import DownloadProgress, download
    from .models.hashing import HashCache

    params = {k: v for k, v in {"source": args.source, "repo": args.repo, "model_id": args.model_id,
                                "version_id": args.version_id, "url": args.url, "file": args.file,
                                "revision": args.revision, "kind": args.kind, "name": args.name,
                                "sha256": args.sha256}.items() if v is not None}
    params["fallback"] = [_fallback_ref(f, args.file) for f in args.fallback]
    dirs = _dirs(args)
    tty = sys.stderr.isatty()

    def progress(p: DownloadProgress) -> None:
        total = f"/{p.total / 2**20:.1f}" if p.total else ""
        eta = f", ETA {p.eta:.0f} s" if p.eta else ""
        line = f"{p.done / 2**20:.1f}{total} MiB, {p.speed / 2**20:.1f} MiB/s{eta}"
        print(("\r" + line + "   ") if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    result = download(params, dirs, _download_settings(args), progress=progress,
                      cache=HashCache(dirs.cache_dir / "hashes.json"))
    if tty:
        print(file=sys.stderr)
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if result["resumed_from"]:
        print(f"resumed from byte {result['resumed_from']}", file=sys.stderr)
    print(f"{dirs.root / result['path'] if not Path(result['path']).is_absolute() else result['path']}  "
          f"sha256 {result['sha256']}")
    return 0


def cmd_models_info(args: argparse.Namespace) -> int:
    """Model cards in this process (no server needed), as the ``model_info`` job writes them."""
    from .engine.engine import Engine
    from .models.cards import fetch_cards, parse_params, targets

    params = parse_params({"all": True, "refresh": args.refresh} if args.all
                          else {"kind": args.kind, "name": args.name, "refresh": args.refresh})
    engine = Engine(_dirs(args), device="cpu")
    result = fetch_cards(targets(engine, params), _download_settings(args), engine.registry.cache.sha256,
                         refresh=params["refresh"], skip_existing=bool(params.get("all")))
    for m in result["models"]:
        detail = m.get("message") or ", ".join(str(m[k]) for k in ("civitai_model", "base_model") if m.get(k))
        print(f"{m['kind']:<11} {m['name']}: {m['status']}" + (f" ({detail})" if detail else ""))
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_extras(args: argparse.Namespace) -> int:
    from datetime import date

    from .engine.engine import Engine, next_sequence_number
    from .engine.images import decode_image
    from .infotext import read_infotext, save_png
    from .upscale.extras import parse_extras, run_extras

    req = parse_extras({
        "images": [_b64_file(p) for p in args.images], "upscaling_resize": args.scale, "upscaler_1": args.upscaler,
        "upscaler_2": args.upscaler_2, "extras_upscaler_2_visibility": args.upscaler_2_visibility,
        "gfpgan_visibility": args.gfpgan, "codeformer_visibility": args.codeformer, "codeformer_weight": args.codeformer_weight,
    })
    engine = Engine(_dirs(args), device=args.device)
    for name in {req.upscaler_1, req.upscaler_2}:
        engine.upscalers.find(name)
    folder = args.out or engine.dirs.outputs_dir / "extras-images" / date.today().isoformat()
    number = next_sequence_number(folder)
    for i, data in enumerate(req.images):
        src = decode_image(data, str(args.images[i]))
        image, info = run_extras(engine, req, src)
        print(save_png(image, folder / f"{number + i:05d}.png", read_infotext(src) or info))
        print(f"  {info}", file=sys.stderr)
    return 0


def cmd_png_info(args: argparse.Namespace) -> int:
    from .errors import MuralistError
    from .infotext import read_infotext

    if not args.file.is_file():
        raise MuralistError(f"{args.file}: no such file")
    text = read_infotext(args.file)
    if text is None:
        raise MuralistError(f"{args.file} carries no generation parameters (no A1111 infotext)")
    print(text)
    return 0


def _store(args: argparse.Namespace) -> Any:
    from .service.store import open_store

    dirs = _dirs(args)
    dirs.root.mkdir(parents=True, exist_ok=True)
    return open_store(args.database, dirs.root)


def cmd_users(args: argparse.Namespace) -> int:
    from .errors import NotFoundError

    store = _store(args)
    try:
        if args.users_command == "add":
            key = store.add_user(args.name, admin=args.admin)
            print(f"created user {args.name}{' (admin)' if args.admin else ''}; API key:", file=sys.stderr)
            print(key)
        elif args.users_command == "reset-key":
            if store.get_user(args.name) is None:
                raise NotFoundError(f"no user {args.name!r}")
            print(store.reset_key(args.name))
        elif args.users_command == "limits":
            _user_limits(store, args.name, args.changes)
        elif args.users_command == "remove":
            if not store.remove_user(args.name):
                raise NotFoundError(f"no user {args.name!r}")
            print(f"removed {args.name}")
        else:
            for u in store.list_users():
                print(f"{u.name}{'  admin' if u.admin else ''}")
    finally:
        store.close()
    return 0


def _user_limits(store: Any, name: str, changes: list[str]) -> None:
    from .errors import InvalidRequestError, NotFoundError
    from .service.core import Limits

    update: dict[str, Any] = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or not value.strip():
            raise InvalidRequestError(f"{change!r}: write LIMIT=N (e.g. max_downloads=1) or LIMIT=default")
        value = value.strip()
        if value == "default":
            update[key] = None
        elif value.isdigit():
            update[key] = int(value)
        else:
            raise InvalidRequestError(f"{change!r}: the value must be a whole number ≥ 0 or 'default'")
    if update:
        store.set_user_limits(name, Limits.check_overrides(update))
    user = store.get_user(name)
    if user is None:
        raise NotFoundError(f"no user {name!r}")
    for key, value in Limits().merged(user.limits).__dict__.items():
        print(f"{key}={value}{'  (set for this user)' if key in user.limits else ''}")


def _devices(spec: str | None, device: str | None = None) -> list[str]:
    """Worker devices: the explicit list, else every GPU (cuda:0, cuda:1, ...), else the CPU."""
    if spec:
        return [d.strip() for d in spec.split(",") if d.strip()]
    if device:
        return [device]
    try:
        import torch

        n = torch.cuda.device_count()
    except ImportError:
        n = 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def _check_port(host: str, port: int) -> None:
    from .doctor import bind_error
    from .errors import MuralistError

    if e := bind_error(host, port):
        raise MuralistError(f"cannot listen on {host}:{port} ({e.strerror}); is muralist already running? "
                            "Choose another port with --port")


def _show_first_key(key: str) -> None:
    """The generated first admin key, once, where an operator looking at the log will see it."""
    line = "=" * 78
    print(f"{line}\nfirst start: created admin user 'admin'; its API key (shown once): {key}\n"
          f"store it now: it cannot be shown again (muralist users reset-key admin makes a new one)\n{line}",
          file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from .errors import MuralistError
    from .logs import setup_logging
    from .service.app import AuthConfig, create_app
    from .service.bootstrap import bootstrap_admin
    from .service.core import Service, Settings

    setup_logging(args.log_format)
    basic: dict[str, str] = {}
    for pair in filter(None, (args.api_auth or "").split(",")):
        name, sep, password = pair.partition(":")
        if not sep or not name or not password:
            raise MuralistError(f"--api-auth takes user:password pairs separated by commas, got {pair!r}")
        basic[name.strip()] = password
    store = _store(args)
    host = "0.0.0.0" if args.listen else args.host
    local_only = host in ("127.0.0.1", "localhost", "::1")
    # On the network without --api-auth or --allow-anonymous, a store without users gets a first
    # admin (its key printed once) rather than a refusal: a fresh container comes up usable and closed.
    try:
        needs_auth = not local_only and not basic and not args.allow_anonymous
        if first_key := bootstrap_admin(store, needs_auth):
            _show_first_key(first_key)
    except MuralistError:
        store.close()
        raise
    keyed = any(u.name != "local" for u in store.list_users())
    dirs = _dirs(args)
    for warning in dirs.ensure():
        logging.getLogger("muralist").warning(warning)
    # One in-process worker per device (several on one device share its model manager). With
    # --cluster the workers are Ray actors on the cluster's machines; local ones only if asked for.
    devices = _devices(args.devices, args.device)
    if args.workers is not None:
        devices = [devices[i % len(devices)] for i in range(args.workers)]
    elif args.cluster and not args.devices:
        devices = []
    settings = Settings(
        workers=len(devices),
        devices=devices,
        cluster=args.cluster,
        stall_timeout=args.stall_timeout,
        lease_seconds=args.lease_timeout,
        max_attempts=args.max_attempts,
        grace=args.grace,
        device=args.device,
        max_loaded_models=args.max_loaded_models,
        max_model_bytes=int(args.max_model_memory * 2**30) if args.max_model_memory else None,
        keep_days=args.keep_days or None,
        downloads=_download_settings(args),
    )
    if args.cluster:  # a wrong address or token: say so now, not in a log line every 2 s
        from .workers.ray_cluster import connect

        connect(args.cluster)
    service = Service(dirs, store, settings)
    origins = [o.strip() for o in args.cors_allow_origins.split(",")] if args.cors_allow_origins else None
    app = create_app(service, AuthConfig(basic, allow_single_user=local_only or args.allow_anonymous,
                                         metrics_public=args.metrics_public), origins)
    _check_port(host, args.port)  # before saying "listening": a taken port is the likeliest start-up error
    logging.getLogger("muralist").info("muralist %slistening on http://%s:%d",
                                       "(single-user mode) " if not basic and not keyed else "", host, args.port)
    # SIGTERM: uvicorn stops accepting and closes connections (5 s for open streams), then the
    # service drains: running jobs finish within --grace or go back to the queue.
    # log_config=None: uvicorn's loggers (access log included) use the handler set up above.
    uvicorn.run(app, host=host, port=args.port, log_level="info", log_config=None, timeout_graceful_shutdown=5)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging
    import signal
    import socket
    import subprocess
    import threading

    from .errors import MuralistError
    from .logs import setup_logging
    from .workers import ray_cluster

    setup_logging(args.log_format)
    log = logging.getLogger("muralist.worker")
    dirs = _dirs(args)
    if not dirs.ckpt_dir.is_dir():
        raise MuralistError(f"no checkpoints folder at {dirs.ckpt_dir}: pass --data-dir (A1111 layout) or --ckpt-dir")
    devices = _devices(args.devices)
    name = args.name or socket.gethostname()
    ray_cluster.auth_env()
    if not args.no_start_node:
        gpus = sum(d.startswith("cuda") for d in devices)
        cmd = ["ray", "start", f"--address={args.cluster}", f"--num-gpus={gpus}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 and "already" not in (done.stdout + done.stderr):
            raise MuralistError(f"'{' '.join(cmd)}' failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    ray_cluster.connect(args.cluster)
    folders = {k: str(getattr(dirs, k)) for k in ("ckpt_dir", "vae_dir", "lora_dir", "embeddings_dir", "controlnet_dir")}
    budget = int(args.max_model_memory * 2**30) if args.max_model_memory else None
    actors = ray_cluster.start_workers(devices, name, str(dirs.root), folders=folders,
                                       max_loaded_models=args.max_loaded_models, max_model_bytes=budget)
    names = [ray_cluster.worker_name(name, d, len(devices)) for d in devices]
    log.info("muralist worker: %s on %s joined %s", ", ".join(names), ", ".join(devices), args.cluster)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(5):
        try:
            ray_cluster.ray_get([a.info.remote() for a in actors], timeout=30)
        except Exception as e:  # Ray restarts a dead actor by itself; say so and carry on
            log.warning("muralist worker: a worker is restarting (%s)", type(e).__name__)
    # Leaving: a running job is interrupted and re-queued by its dispatcher (not counted as a
    # failure), then the actors go.
    log.info("muralist worker: leaving %s", args.cluster)
    ray_cluster.leave_workers(names)
    if not args.no_start_node:
        subprocess.run(["ray", "stop"], capture_output=True)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import report, run_checks

    checks = run_checks(_dirs(args), args.database, "0.0.0.0" if args.listen else args.host, args.port, args.cluster)
    text, code = report(checks, args.json)
    print(text)
    return code


def cmd_cluster(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from .errors import MuralistError
    from .workers import ray_cluster

    token = os.environ.get("RAY_AUTH_TOKEN")
    extra = [f"--node-ip-address={args.node_ip_address}"] if args.node_ip_address else []
    cmd, env = ray_cluster.start_head(args.port, token, extra)
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise MuralistError(f"'{' '.join(cmd)}' failed: {(done.stderr or done.stdout).strip()[-500:]}")
    host = args.node_ip_address or "THIS_HOST"
    print(f"Ray head started on port {args.port} with token authentication. On this machine and every worker machine:\n"
          f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={env['RAY_AUTH_TOKEN']}\n"
          f"then here:  muralist serve --cluster 127.0.0.1:{args.port} --database postgresql://...\n"
          f"and there:  muralist worker --cluster {host}:{args.port} --data-dir /path/to/a1111")
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    """Train in this process: the TOML's train_data_dir is a folder path here (the server takes
    dataset names); the LoRA, its epoch files and sidecar go to models/Lora/."""
    from .models.loader import load_checkpoint
    from .models.registry import ModelRegistry
    from .training.lora import Saved, train_lora
    from .training.options import parse_options, read_toml

    dirs = _dirs(args)
    opts, notes = parse_options(read_toml(args.config))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    data = Path(opts.train_data_dir).expanduser()
    if not data.is_absolute():
        data = (args.config.parent / data) if (args.config.parent / data).is_dir() else data.resolve()
    info = ModelRegistry(dirs).find_checkpoint(opts.pretrained_model_name_or_path)
    model = load_checkpoint(info.path, info.kind, info.prediction_type, args.device)
    dirs.lora_dir.mkdir(parents=True, exist_ok=True)
    state_path = dirs.lora_dir / f"{opts.output_name}.state.pt"

    def save(s: Saved) -> None:
        target = state_path if s.kind == "state" else dirs.lora_dir / s.name
        target.write_bytes(s.data)
        if s.kind != "state":
            print(target)

    def progress(p: Any) -> None:
        print(f"\repoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} loss {p.loss:.4f} lr {p.lr:.2e}", end="", file=sys.stderr)

    resume = args.resume.read_bytes() if args.resume else None
    result = train_lora(model, info, opts, data, progress=progress, save=save, resume=resume)
    print(file=sys.stderr)
    state_path.unlink(missing_ok=True)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, the chosen command's options defaulting to MURALIST_* variables."""
    from .envflags import apply_env

    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in ENV_COMMANDS:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        apply_env(sub.choices[words[0]])
    return parser.parse_args(words)


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import MuralistError

    try:
        args = _parse(argv)
    except MuralistError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    handlers = {
        "generate": cmd_generate,
        "png-info": cmd_png_info,
        "serve": cmd_serve,
        "worker": cmd_worker,
        "doctor": cmd_doctor,
        "cluster": cmd_cluster,
        "extras": cmd_extras,
        "users": cmd_users,
        "models": lambda a: {"list": cmd_models_list, "make-tiny": cmd_make_tiny,
                             "merge": cmd_models_merge, "download": cmd_models_download,
                             "info": cmd_models_info}[a.models_command](a),
        "train": cmd_train_lora,
    }
    try:
        return handlers[args.command](args)
    except MuralistError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
