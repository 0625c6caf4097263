"""Upscalers on spandrel: model files from A1111's folders, A1111's size rules, tiling and the registry.

ESRGAN (old, BSRGAN and basicsr/Real-ESRGAN layouts), SRVGGNetCompact and SwinIR state dicts are
written out here key by key in their published layouts with tiny random weights; HAT and DAT come
from spandrel's own classes (the original key layouts) at tiny sizes. They are saved as .pth and
.safetensors into an A1111-style data folder and read back through the production loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import spandrel
import torch
from PIL import Image

from muralist.errors import InvalidRequestError, ModelFileError, NotFoundError
from muralist.paths import DataDirs
from muralist.upscale import upscalers as up
from muralist.upscale.upscalers import (
    UpscalerRegistry,
    describe_file,
    dest_size,
    load_upscaler_model,
    upscale,
)

# ---------------------------------------------------------------------------------------------
# Reference layouts, spelled out independently of muralist's modules


class _Weights:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def conv(self, name: str, cout: int, cin: int, k: int = 3) -> None:
        self.sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=self.g) * (0.5 / (cin * k * k) ** 0.5)
        self.sd[f"{name}.bias"] = torch.randn(cout, generator=self.g) * 0.01

    def linear(self, name: str, cout: int, cin: int, bias: bool = True) -> None:
        self.sd[f"{name}.weight"] = torch.randn(cout, cin, generator=self.g) * (1 / cin**0.5)
        if bias:
            self.sd[f"{name}.bias"] = torch.randn(cout, generator=self.g) * 0.01

    def norm(self, name: str, dim: int) -> None:
        self.sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(dim, generator=self.g)
        self.sd[f"{name}.bias"] = 0.01 * torch.randn(dim, generator=self.g)


def rrdb_new(nf=8, nb=1, gc=32, n_up=2, unshuffle=1, in_ch=3, out_ch=3, seed=0) -> dict[str, torch.Tensor]:
    """basicsr's RRDBNet (Real-ESRGAN x4plus / x2plus) key layout."""
    w = _Weights(seed)
    w.conv("conv_first", nf, in_ch * unshuffle**2)
    for i in range(nb):
        for k in (1, 2, 3):
            for j in range(1, 6):
                w.conv(f"body.{i}.rdb{k}.conv{j}", gc if j < 5 else nf, nf + (j - 1) * gc)
    w.conv("conv_body", nf, nf)
    for u in range(1, n_up + 1):
        w.conv(f"conv_up{u}", nf, nf)
    w.conv("conv_hr", nf, nf)
    w.conv("conv_last", out_ch, nf)
    return w.sd


def new_to_old(sd: dict[str, torch.Tensor], nb: int, n_up: int) -> dict[str, torch.Tensor]:
    """The same weights in the original ESRGAN layout (one flat Sequential called "model")."""
    old = {}
    for key, v in sd.items():
        name, param = key.rsplit(".", 1)
        if name.startswith("body."):
            _, i, rdb, conv = name.split(".")
            old[f"model.1.sub.{i}.RDB{rdb[3:]}.{conv}.0.{param}"] = v
        elif name == "conv_first":
            old[f"model.0.{param}"] = v
        elif name == "conv_body":
            old[f"model.1.sub.{nb}.{param}"] = v
        elif name.startswith("conv_up"):
            old[f"model.{3 * int(name[7:])}.{param}"] = v
        elif name == "conv_hr":
            old[f"model.{3 * n_up + 2}.{param}"] = v
        elif name == "conv_last":
            old[f"model.{3 * n_up + 4}.{param}"] = v
    return old


def new_to_bsrgan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, v in sd.items():
        if key.startswith("body."):
            key = "RRDB_trunk." + key[len("body.") :].replace(".rdb", ".RDB")
        key = key.replace("conv_body.", "trunk_conv.").replace("conv_up", "upconv").replace("conv_hr.", "HRconv.")
        out[key] = v
    return out


def srvgg(nf=8, num_conv=2, scale=4, seed=1) -> dict[str, torch.Tensor]:
    """Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3 / animevideov3) key layout."""
    w = _Weights(seed)
    w.conv("body.0", nf, 3)
    w.sd["body.1.weight"] = torch.full((nf,), 0.25)
    for i in range(num_conv):
        w.conv(f"body.{2 * i + 2}", nf, nf)
        w.sd[f"body.{2 * i + 3}.weight"] = torch.full((nf,), 0.25)
    w.conv(f"body.{2 * num_conv + 2}", 3 * scale * scale, nf)
    return w.sd


def relative_index(window: int) -> torch.Tensor:
    """Row of the bias table for each pair of window positions, as SwinIR saves it."""
    pos = [(i, j) for i in range(window) for j in range(window)]
    rows = [[(a - c + window - 1) * (2 * window - 1) + (b - d + window - 1) for c, d in pos] for a, b in pos]
    return torch.tensor(rows, dtype=torch.long)


def swinir(embed=16, depths=(2,), heads=(2,), window=4, mlp=32, upsampler="nearest+conv", scale=4,
           num_feat=64, resi="1conv", seed=2) -> dict[str, torch.Tensor]:  # fmt: skip
    """SwinIR's key layout, including the buffers the original code saves."""
    w = _Weights(seed)
    w.conv("conv_first", embed, 3)
    w.norm("patch_embed.norm", embed)
    n = window * window
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        for j in range(depth):
            b = f"layers.{i}.residual_group.blocks.{j}"
            w.norm(f"{b}.norm1", embed)
            w.sd[f"{b}.attn.relative_position_bias_table"] = 0.02 * torch.randn((2 * window - 1) ** 2, h, generator=w.g)
            w.sd[f"{b}.attn.relative_position_index"] = relative_index(window)
            w.linear(f"{b}.attn.qkv", 3 * embed, embed)
            w.linear(f"{b}.attn.proj", embed, embed)
            w.norm(f"{b}.norm2", embed)
            w.linear(f"{b}.mlp.fc1", mlp, embed)
            w.linear(f"{b}.mlp.fc2", embed, mlp)
            if j % 2:
                w.sd[f"{b}.attn_mask"] = torch.zeros((64 // window) ** 2, n, n)  # for img_size 64
        if resi == "1conv":
            w.conv(f"layers.{i}.conv", embed, embed)
        else:
            w.conv(f"layers.{i}.conv.0", embed // 4, embed)
            w.conv(f"layers.{i}.conv.2", embed // 4, embed // 4, 1)
            w.conv(f"layers.{i}.conv.4", embed, embed // 4)
    w.norm("norm", embed)
    if resi == "1conv":
        w.conv("conv_after_body", embed, embed)
    else:
        w.conv("conv_after_body.0", embed // 4, embed)
        w.conv("conv_after_body.2", embed // 4, embed // 4, 1)
        w.conv("conv_after_body.4", embed, embed // 4)
    if upsampler == "nearest+conv":
        w.conv("conv_before_upsample.0", num_feat, embed)
        for u in range(1, scale.bit_length()):
            w.conv(f"conv_up{u}", num_feat, num_feat)
        w.conv("conv_hr", num_feat, num_feat)
        w.conv("conv_last", 3, num_feat)
    elif upsampler == "pixelshuffle":
        w.conv("conv_before_upsample.0", num_feat, embed)
        for u in range(scale.bit_length() - 1):
            w.conv(f"upsample.{2 * u}", 4 * num_feat, num_feat)
        w.conv("conv_last", 3, num_feat)
    elif upsampler == "pixelshuffledirect":
        w.conv("upsample.0", 3 * scale * scale, embed)
    else:
        w.conv("conv_last", 3, embed)
    return w.sd


def hat(scale: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    """HAT's layout (HAT_SRx2/x4 as released), from spandrel's port of the original class."""
    from spandrel.architectures.HAT import HAT

    torch.manual_seed(seed)
    net = HAT(img_size=16, embed_dim=12, depths=[2], num_heads=[2], window_size=4, upscale=scale, num_feat=8,
              compress_ratio=3, squeeze_factor=3, mlp_ratio=2.0)  # fmt: skip
    return net.state_dict()


def dat(scale: int = 2, seed: int = 4) -> dict[str, torch.Tensor]:
    """DAT's layout (DAT_x2/x3/x4 as released), from spandrel's port of the original class."""
    from spandrel.architectures.DAT import DAT

    torch.manual_seed(seed)
    net = DAT(img_size=16, embed_dim=16, split_size=[2, 4], depth=[2], num_heads=[2], upscale=scale,
              expansion_factor=2.0)  # fmt: skip
    return net.state_dict()


def restoreformer() -> dict[str, torch.Tensor]:
    """A tiny RestoreFormer: a face restorer spandrel knows, which is no upscaler."""
    from spandrel.architectures.RestoreFormer import RestoreFormer

    net = RestoreFormer(n_embed=16, embed_dim=8, ch=32, out_ch=3, ch_mult=(1, 1), num_res_blocks=1,
                        attn_resolutions=(16,), resolution=512, z_channels=32, head_size=8)  # fmt: skip
    return net.state_dict()


def save(sd: dict[str, torch.Tensor], path: Path, wrap: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({wrap: sd} if wrap else sd, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny networks gain nothing from threads, and on a busy machine spinning threads make
    # each of the hundreds of small tile runs many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An A1111 data folder with one tiny model per layout and architecture."""
    root = tmp_path_factory.mktemp("upscalers")
    esrgan, realesrgan, swin = (root / "models" / f for f in ("ESRGAN", "RealESRGAN", "SwinIR"))
    x4 = rrdb_new()
    save(x4, realesrgan / "RealESRGAN_x4plus.pth", wrap="params_ema")
    save(rrdb_new(unshuffle=2, seed=3), realesrgan / "RealESRGAN_x2plus.pth", wrap="params_ema")
    save(srvgg(), realesrgan / "realesr-general-x4v3.pth", wrap="params")
    save(new_to_old(x4, nb=1, n_up=2), esrgan / "old-4x.pth")
    save(new_to_old(rrdb_new(n_up=1, seed=4), nb=1, n_up=1), esrgan / "old-2x.safetensors")
    save(new_to_bsrgan(x4), esrgan / "bsrgan-4x.pth")
    save(rrdb_new(unshuffle=4, seed=5), esrgan / "sub" / "realesrgan-1x.safetensors")
    save(swinir(), swin / "SwinIR_4x.pth", wrap="params_ema")
    save(swinir(upsampler="pixelshuffle", scale=2, depths=(2, 1), heads=(2, 4), resi="3conv"), swin / "SwinIR_2x.pth")
    save(hat(), root / "models" / "HAT" / "HAT_SRx2.pth", wrap="params_ema")
    save(dat(), root / "models" / "DAT" / "DAT_x2.safetensors")
    (esrgan / "notes.txt").write_text("not a model")
    return root


@pytest.fixture()
def registry(data: Path) -> UpscalerRegistry:
    return UpscalerRegistry(DataDirs.from_options(data))


def picture(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise, so Lanczos and the networks see realistic content.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(w + h - 2, 1)], -1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


# ---------------------------------------------------------------------------------------------
# Loading: every layout from its A1111 folder, the right scale, clear errors for other files


@pytest.mark.parametrize(
    ("file", "arch", "scale"),
    [
        ("RealESRGAN/RealESRGAN_x4plus.pth", "ESRGAN", 4),
        ("RealESRGAN/RealESRGAN_x2plus.pth", "ESRGAN", 2),
        ("RealESRGAN/realesr-general-x4v3.pth", "RealESRGAN Compact", 4),
        ("ESRGAN/old-4x.pth", "ESRGAN", 4),
        ("ESRGAN/old-2x.safetensors", "ESRGAN", 2),
        ("ESRGAN/bsrgan-4x.pth", "ESRGAN", 4),
        ("ESRGAN/sub/realesrgan-1x.safetensors", "ESRGAN", 1),
        ("SwinIR/SwinIR_4x.pth", "SwinIR", 4),
        ("SwinIR/SwinIR_2x.pth", "SwinIR", 2),
        ("HAT/HAT_SRx2.pth", "HAT", 2),
        ("DAT/DAT_x2.safetensors", "DAT", 2),
    ],
)
def test_files_load_in_every_format(data: Path, file: str, arch: str, scale: int) -> None:
    path = data / "models" / file
    listed = describe_file(path)  # what listing shows, built from shapes without the weights
    model = load_upscaler_model(path)
    assert (listed.arch, listed.scale) == (model.spec.arch, model.scale) == (arch, scale)
    assert listed == model.spec
    out = model.upscale_image(picture(21, 17))
    assert out.size == (21 * scale, 17 * scale) and out.mode == "RGB"


@pytest.mark.parametrize(
    ("sd", "arch", "scale"),
    [
        (rrdb_new(nf=12, nb=3, unshuffle=2), "ESRGAN", 2),
        (rrdb_new(n_up=3), "ESRGAN", 8),
        (new_to_old(rrdb_new(nb=2, n_up=1), nb=2, n_up=1), "ESRGAN", 2),
        (srvgg(nf=6, num_conv=3, scale=2), "RealESRGAN Compact", 2),
        (swinir(upsampler="pixelshuffledirect", scale=3), "SwinIR", 3),
        (swinir(upsampler="", window=7), "SwinIR", 1),  # SwinIR's denoising / JPEG models
    ],
)  # fmt: skip
def test_layout_variants_load_with_their_scale(tmp_path: Path, sd: dict[str, torch.Tensor], arch: str, scale: int) -> None:
    model = load_upscaler_model(save(sd, tmp_path / "variant.pth"))
    assert (model.spec.arch, model.scale) == (arch, scale)
    assert model.upscale_image(picture(18, 13)).size == (18 * scale, 13 * scale)


def test_old_bsrgan_and_new_layouts_compute_the_same(tmp_path: Path) -> None:
    sd = rrdb_new(nb=2, seed=7)
    x = torch.rand(1, 3, 9, 11)
    outs = []
    for name, layout in (("new.pth", sd), ("old.pth", new_to_old(sd, nb=2, n_up=2)), ("bsrgan.safetensors", new_to_bsrgan(sd))):
        outs.append(load_upscaler_model(save(layout, tmp_path / name)).upscale_tensor(x, tile=0))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_network_sees_rgb_in_0_1_and_output_lands_in_place(tmp_path: Path) -> None:
    # SRVGGNetCompact adds its conv output to the nearest-upscaled input. With the last conv's
    # weights zeroed and +0.25 bias on the red sub-pixels only, the result must be exactly the
    # nearest upscale with red raised by 64: a channel swap, a wrong range or an offset shows.
    sd = srvgg(seed=9)
    last = max(int(k.split(".")[1]) for k in sd)
    sd[f"body.{last}.weight"].zero_()
    sd[f"body.{last}.bias"].zero_()
    sd[f"body.{last}.bias"][:16] = 0.25  # pixel shuffle: channels 0..15 become red's 4x4 sub-pixels
    model = load_upscaler_model(save(sd, tmp_path / "identity.pth"))
    img = picture(19, 11)
    expected = np.asarray(img.resize((76, 44), Image.Resampling.NEAREST)).astype(np.int16)
    expected[..., 0] = np.minimum(expected[..., 0] + 64, 255)
    for tile in (0, 8):
        got = np.asarray(model.upscale_image(img, tile=tile)).astype(np.int16)
        assert np.abs(got - expected).max() <= 1, tile


def test_small_images_and_tiles_meet_the_model_minimum(data: Path) -> None:
    # HAT needs inputs of at least 16 pixels: smaller images and tiles are padded, then cropped.
    model = load_upscaler_model(data / "models" / "HAT" / "HAT_SRx2.pth")
    assert model.spec.size_requirements.minimum == 16
    assert model.upscale_image(picture(5, 7)).size == (10, 14)
    x = torch.rand(1, 3, 40, 30, generator=torch.Generator().manual_seed(0))
    tiled = model.upscale_tensor(x, tile=8, tile_overlap=4)
    assert tiled.shape == (1, 3, 80, 60) and torch.isfinite(tiled).all()


def test_unknown_and_broken_files_are_model_file_errors(tmp_path: Path) -> None:
    unknown = save({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "mystery.safetensors")
    with pytest.raises(ModelFileError, match="mystery.safetensors is not a supported upscaler model"):
        load_upscaler_model(unknown)
    with pytest.raises(ModelFileError, match="mystery.safetensors is not a supported upscaler model"):
        describe_file(unknown)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="garbage.pth"):
        load_upscaler_model(garbage)
    # Recognised layout, but tensors that do not fit it (half of ESRGAN+'s conv1x1): named, not a traceback.
    plus = new_to_old(rrdb_new(), nb=1, n_up=2)
    plus["model.1.sub.0.RDB1.conv1x1.weight"] = torch.zeros(4, 8, 1, 1)
    for read in (load_upscaler_model, describe_file):
        with pytest.raises(ModelFileError, match=r"plus.pth looks like an ESRGAN model but its tensors do not fit .*conv1x1"):
            read(save(plus, tmp_path / "plus.pth"))


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        (restoreformer(), "is a RestoreFormer face restoration model, not an upscaler; .*models/GFPGAN"),
        ({"position_emb": torch.zeros(4, 8), "quantize.embedding.weight": torch.zeros(16, 8)},
         "is a CodeFormer face restoration model, not an upscaler; put it in models/Codeformer"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
         "is a Stable Diffusion checkpoint, not an upscaler; put it in models/Stable-diffusion"),
        ({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, "is a LoRA, not an upscaler; put it in models/Lora"),
    ],
)  # fmt: skip
def test_other_kinds_of_model_say_what_they_are(tmp_path: Path, sd: dict[str, torch.Tensor], message: str) -> None:
    # Through the registry, as a user meets it: listed (no scale), and using it names the file.
    save(sd, tmp_path / "models" / "ESRGAN" / "stray.safetensors")
    registry = UpscalerRegistry(DataDirs.from_options(tmp_path))
    info = registry.find("stray")
    assert info.scale is None and info.arch is None
    with pytest.raises(ModelFileError, match="stray.safetensors " + message):
        upscale(picture(8, 8), "stray", registry, scale=2)


# ---------------------------------------------------------------------------------------------
# A1111's size rules


def test_dest_size_rule() -> None:
    assert dest_size(100, 75, 2) == (200, 144)  # 150 -> 144
    assert dest_size(100, 75, 2.5) == (248, 184)  # 250 -> 248, 187.5 -> 184
    assert dest_size(100, 75, 4) == (400, 296)
    assert dest_size(512, 512, 1.5) == (768, 768)


@pytest.fixture()
def passes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Input sizes of every model pass."""
    seen: list[tuple[int, int]] = []
    original = up.UpscalerModel.upscale_image

    def counting(self, image, tile=192, tile_overlap=8):
        seen.append(image.size)
        return original(self, image, tile, tile_overlap)

    monkeypatch.setattr(up.UpscalerModel, "upscale_image", counting)
    return seen


@pytest.mark.parametrize(
    ("model", "scale", "size", "expected_passes"),
    [
        ("R-ESRGAN 4x+", 2, (200, 144), [(100, 75)]),
        ("R-ESRGAN 4x+", 2.5, (248, 184), [(100, 75)]),
        ("R-ESRGAN 4x+", 4, (400, 296), [(100, 75)]),
        ("R-ESRGAN 2x+", 2, (200, 144), [(100, 75)]),
        ("R-ESRGAN 2x+", 4, (400, 296), [(100, 75), (200, 150)]),
        ("R-ESRGAN 2x+", 2.5, (248, 184), [(100, 75), (200, 150)]),  # 2 passes then Lanczos down
        ("realesrgan-1x", 2, (200, 144), [(100, 75)]),  # 1x: a pass that does not grow ends the loop
    ],
)
def test_scale_follows_a1111(registry, passes, model, scale, size, expected_passes) -> None:
    out = upscale(picture(100, 75), model, registry, scale=scale, tile=64)
    assert out.size == size
    assert passes == expected_passes


def test_at_most_three_passes_then_lanczos(registry, passes) -> None:
    out = upscale(picture(24, 16), "R-ESRGAN 2x+", registry, scale=16)
    assert passes == [(24, 16), (48, 32), (96, 64)]  # 192x128 after 3 passes, short of 384x256
    assert out.size == (384, 256)


def test_target_size_follows_resize_image(registry, passes) -> None:
    # factor max(300/100, 200/75) = 3: scale-by-3 target 300x224 (one 4x pass), then exact Lanczos.
    out = upscale(picture(100, 75), "R-ESRGAN 4x+", registry, target=(300, 200))
    assert out.size == (300, 200) and passes == [(100, 75)]
    passes.clear()
    out = upscale(picture(100, 75), "R-ESRGAN 2x+", registry, target=(300, 200))
    assert out.size == (300, 200) and passes == [(100, 75), (200, 150)]
    passes.clear()
    # Not an enlargement: no model pass, just Lanczos.
    out = upscale(picture(100, 75), "R-ESRGAN 4x+", registry, target=(80, 60))
    assert out.size == (80, 60) and passes == []


def test_builtin_upscalers() -> None:
    img = picture(100, 75)
    assert upscale(img, "None", scale=2).size == (100, 75)  # extras skips "None"
    assert upscale(img, "None", target=(300, 200)).size == (300, 200)  # resize_image: plain Lanczos
    for name in ("Lanczos", "Nearest"):
        assert upscale(img, name, scale=2).size == (200, 144)
        assert upscale(img, name, scale=2.5).size == (248, 184)
        assert upscale(img, name, target=(300, 200)).size == (300, 200)
    # Nearest at a multiple-of-8 size is pure pixel repetition.
    big = upscale(picture(16, 8), "Nearest", scale=2)
    assert np.array_equal(np.asarray(big), np.asarray(picture(16, 8)).repeat(2, 0).repeat(2, 1))
    # Lanczos matches Pillow's resize when no //8 correction applies.
    assert np.array_equal(
        np.asarray(upscale(picture(16, 8), "Lanczos", scale=2)),
        np.asarray(picture(16, 8).resize((32, 16), Image.Resampling.LANCZOS)),
    )


def test_bad_requests() -> None:
    img = picture(20, 20)
    with pytest.raises(InvalidRequestError):
        upscale(img, "Lanczos", scale=2, target=(40, 40))
    with pytest.raises(InvalidRequestError):
        upscale(img, "Lanczos")
    with pytest.raises(InvalidRequestError):
        upscale(img, "Lanczos", scale=0)
    with pytest.raises(InvalidRequestError, match="at least 1x1"):
        upscale(img, "Lanczos", scale=0.1)  # 2 // 8 * 8 == 0
    with pytest.raises(InvalidRequestError, match="limited"):
        upscale(img, "Lanczos", scale=10000)
    with pytest.raises(NotFoundError, match="Lanczos"):
        upscale(img, "Lanczso", scale=2)  # no registry: only built-ins, typo suggested


# ---------------------------------------------------------------------------------------------
# Tiling


@pytest.mark.parametrize(
    ("file", "context", "size", "tile"),
    [
        # The context must cover the receptive field: ~18.25 input pixels for one RRDB block at
        # 4x; 2x / 4x that when the network runs after a 2x / 4x pixel-unshuffle.
        ("RealESRGAN/RealESRGAN_x4plus.pth", 20, (93, 70), 16),
        ("RealESRGAN/RealESRGAN_x2plus.pth", 40, (171, 130), 32),
        ("ESRGAN/sub/realesrgan-1x.safetensors", 76, (301, 247), 64),
        ("RealESRGAN/realesr-general-x4v3.pth", 4, (45, 38), 16),
    ],
)
def test_tiled_equals_untiled(data: Path, file: str, context: int, size: tuple[int, int], tile: int) -> None:
    model = load_upscaler_model(data / "models" / file)
    w, h = size  # odd sizes: neither tile nor unshuffle multiples
    assert 2 * context + tile < min(w, h)  # so some tiles really see only part of the image
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    whole = model.upscale_tensor(x, tile=0)
    tiled = model.upscale_tensor(x, tile=tile, tile_overlap=context)
    assert tiled.shape == whole.shape == (1, 3, h * model.scale, w * model.scale)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)
    # Without context the seams differ, so the test above really compared tiled output.
    assert not torch.allclose(model.upscale_tensor(x, tile=tile, tile_overlap=0), whole, atol=1e-3)

    img = picture(w, h)
    a = np.asarray(model.upscale_image(img, tile=tile, tile_overlap=context), dtype=np.int16)
    b = np.asarray(model.upscale_image(img, tile=0), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_default_tiling_covers_large_images(data: Path) -> None:
    model = load_upscaler_model(data / "models" / "RealESRGAN" / "realesr-general-x4v3.pth")
    img = picture(400, 210)  # three by two tiles of <= 192 at the defaults
    out = model.upscale_image(img)
    assert out.size == (1600, 840)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(model.upscale_image(img, tile=0), dtype=np.int16))
    assert diff.max() <= 1  # default overlap 8 covers this small network's receptive field


@pytest.mark.parametrize("file", ["SwinIR/SwinIR_4x.pth", "SwinIR/SwinIR_2x.pth", "HAT/HAT_SRx2.pth"])
def test_swin_speed_ups_change_no_pixel(data: Path, file: str) -> None:
    # muralist shares shift masks between blocks and fuses SwinIR's attention; the output must stay
    # spandrel's own, at the training size and at others (where the shift masks are rebuilt).
    path = data / "models" / file
    model = load_upscaler_model(path)
    plain = spandrel.ModelLoader().load_from_state_dict(up.read_upscaler_state(path)).eval()
    reference = up.UpscalerModel(plain, model.spec, "plain", torch.device("cpu"))
    x = torch.rand(1, 3, 26, 21, generator=torch.Generator().manual_seed(0))
    for tile in (0, 16):
        ours = model.upscale_tensor(x, tile=tile, tile_overlap=4)
        theirs = reference.upscale_tensor(x, tile=tile, tile_overlap=4)
        assert theirs.std() > 1e-3  # varied pixels, not an image clamped flat
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_swinir_tiles_and_pads_to_the_window(data: Path) -> None:
    model = load_upscaler_model(data / "models" / "SwinIR" / "SwinIR_4x.pth")
    x = torch.rand(1, 3, 19, 17)  # not a multiple of the window (4)
    whole = model.upscale_tensor(x, tile=0)
    assert whole.shape == (1, 3, 76, 68)
    torch.testing.assert_close(model.upscale_tensor(x, tile=64), whole)  # one tile == untiled
    tiled = model.upscale_tensor(torch.rand(1, 3, 40, 30), tile=16, tile_overlap=8)
    assert tiled.shape == (1, 3, 160, 120) and torch.isfinite(tiled).all()


def test_alpha_and_grey_images_keep_their_mode(registry) -> None:
    rgba = picture(20, 12, "RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    out = upscale(rgba, "R-ESRGAN 4x+", registry, scale=4)
    assert out.mode == "RGBA" and out.size == (80, 48)
    assert abs(int(np.asarray(out.getchannel("A")).mean()) - 128) <= 1
    grey = upscale(picture(20, 12, "L"), "R-ESRGAN 4x+", registry, scale=2)
    assert grey.mode == "L" and grey.size == (40, 24)
    palette = upscale(picture(20, 12).convert("P"), "Lanczos", scale=2)
    assert palette.mode == "RGB" and palette.size == (40, 24)


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_builtins_then_models(registry: UpscalerRegistry) -> None:
    infos = registry.list()
    names = [i.name for i in infos]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert names[3:] == sorted(names[3:], key=str.lower)
    assert set(names[3:]) == {
        "R-ESRGAN 4x+",  # Real-ESRGAN downloads get A1111's display names
        "R-ESRGAN 2x+",
        "R-ESRGAN General 4xV3",
        "old-4x",  # other files: their stem
        "old-2x",
        "bsrgan-4x",
        "realesrgan-1x",
        "SwinIR_4x",
        "SwinIR_2x",
        "HAT_SRx2",  # A1111 >= 1.8's DAT and HAT folders
        "DAT_x2",
    }
    by_name = {i.name: i for i in infos}
    assert by_name["Lanczos"].path is None and not by_name["Lanczos"].is_model
    assert (by_name["R-ESRGAN 2x+"].scale, by_name["R-ESRGAN 2x+"].arch) == (2, "ESRGAN")
    assert by_name["realesrgan-1x"].scale == 1
    assert by_name["SwinIR_4x"].path.name == "SwinIR_4x.pth"
    assert (by_name["HAT_SRx2"].arch, by_name["HAT_SRx2"].scale) == ("HAT", 2)
    assert (by_name["DAT_x2"].arch, by_name["DAT_x2"].scale) == ("DAT", 2)
    assert by_name["R-ESRGAN General 4xV3"].arch == "RealESRGAN Compact"


def test_registry_find_and_typos(registry: UpscalerRegistry) -> None:
    assert registry.find("R-ESRGAN 4x+").path.name == "RealESRGAN_x4plus.pth"
    assert registry.find("lanczos").name == "Lanczos"
    assert upscale(picture(16, 16), "nearest", registry, scale=2).size == (32, 32)
    with pytest.raises(NotFoundError) as err:
        registry.find("R-ESRGAN 4x")
    assert "did you mean" in str(err.value) and "R-ESRGAN 4x+" in str(err.value)
    with pytest.raises(NotFoundError, match="old-4x"):
        registry.find("old4x")


def test_registry_duplicate_stems_stay_distinct(tmp_path: Path) -> None:
    for folder in ("ESRGAN", "SwinIR"):
        save(rrdb_new(), tmp_path / "models" / folder / "same.pth")
    save(rrdb_new(), tmp_path / "models" / "ESRGAN" / "Lanczos.pth")
    names = UpscalerRegistry(DataDirs.from_options(tmp_path)).names()
    assert names.count("Lanczos") == 1 and "Lanczos (ESRGAN/Lanczos.pth)" in names
    assert "same" in names and "same (SwinIR/same.pth)" in names


def test_registry_caches_loaded_models(registry: UpscalerRegistry, data: Path) -> None:
    registry.max_loaded = 1
    first = registry.load("R-ESRGAN 4x+")
    assert registry.load("R-ESRGAN 4x+") is first
    registry.load("old-4x")  # evicts the first
    assert registry.load("R-ESRGAN 4x+") is not first
    with pytest.raises(InvalidRequestError):
        registry.load("Lanczos")
