"""Face restoration: tiny random CodeFormer/GFPGAN models in the released key layouts, in A1111 folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muralist.errors import InvalidRequestError, ModelFileError, MuralistError
from muralist.upscale import faces
from muralist.upscale.faces import CodeFormer, FaceRestorers, GFPGANv1Clean, face_crop_box, restore_boxes


def tiny_codeformer() -> CodeFormer:
    # 16x16 faces, 4x4 latent, fusion at 8 and 16: every structural feature of the real one, tiny.
    torch.manual_seed(0)
    model = CodeFormer(
        nf=32, ch_mult=(1, 1, 2), res_blocks=1, attn_resolutions=(4,), img_size=16, codebook_size=16,
        emb_dim=32, dim_embd=32, n_head=4, n_layers=1, connect_list=("8", "16"),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial weights so the output differs from input
    return model.eval()


@pytest.fixture(scope="module")
def cf_state() -> dict[str, torch.Tensor]:
    return tiny_codeformer().state_dict()


@pytest.fixture()
def data_dir(tmp_path: Path, cf_state: dict[str, torch.Tensor]) -> Path:
    folder = tmp_path / "models" / "Codeformer"
    folder.mkdir(parents=True)
    # BasicSR's release format: the EMA weights under "params_ema".
    torch.save({"params_ema": cf_state}, folder / "codeformer-v0.1.0.pth")
    return tmp_path


def face_image(size: int = 96) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size, size + 16, 3), dtype=np.uint8))


def test_real_layout_matches_released_tables() -> None:
    # The released model's hard-coded fusion tables come out of the structural rule.
    with torch.device("meta"):
        real = CodeFormer()
        rebuilt = CodeFormer.from_state_dict(real.state_dict())
    assert real.fuse_encoder_block == {"32": 14, "64": 11, "128": 8, "256": 5}
    assert real.fuse_generator_block == {"32": 9, "64": 12, "128": 15, "256": 18}
    assert 90e6 < sum(p.numel() for p in real.parameters()) < 100e6
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }
    assert rebuilt.img_size == 512 and rebuilt.latent_res == 16
    assert "encoder.blocks.0.weight" in real.state_dict() and "quantize.embedding.weight" in real.state_dict()


def test_detect_and_load_from_a1111_folder(data_dir: Path, cf_state: dict[str, torch.Tensor]) -> None:
    restorers = FaceRestorers(data_dir)
    path = restorers.find("codeformer")
    assert path == data_dir / "models" / "Codeformer" / "codeformer-v0.1.0.pth"
    sd = faces.load_face_state_dict(path)
    assert faces.detect_architecture(sd) == "CodeFormer"
    net = restorers.load("CodeFormer")
    assert isinstance(net, CodeFormer) and net.img_size == 16
    assert all(torch.equal(net.state_dict()[k], v) for k, v in cf_state.items())
    assert restorers.load("CodeFormer") is net  # cached


def test_any_pth_in_folder_is_used(tmp_path: Path, cf_state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "models" / "Codeformer"
    folder.mkdir(parents=True)
    torch.save({"params": cf_state}, folder / "my-faces.pth")
    assert isinstance(FaceRestorers(tmp_path).load("CodeFormer"), CodeFormer)


def test_fidelity_weight_reaches_network(cf_state: dict[str, torch.Tensor]) -> None:
    net = faces.build_face_model(cf_state)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out0, out1 = net(x, w=0.0), net(x, w=1.0)
    assert out0.shape == x.shape
    assert not torch.allclose(out0, out1)


def test_no_face_leaves_image_unchanged(data_dir: Path) -> None:
    image = Image.new("RGB", (120, 80), (90, 140, 200))
    out = FaceRestorers(data_dir).restore(image, "CodeFormer", visibility=1.0, weight=0.5)
    assert out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_restore_box_changes_only_the_crop(data_dir: Path) -> None:
    net = FaceRestorers(data_dir).load("CodeFormer")
    image = face_image()
    box = (40, 30, 70, 60)
    out = restore_boxes(image, [box], net, visibility=1.0, weight=0.5)
    assert out.size == image.size
    src, dst = np.asarray(image), np.asarray(out)
    x0, y0, x1, y1 = face_crop_box(box)
    outside = np.ones(src.shape[:2], bool)
    outside[max(y0, 0) : y1, max(x0, 0) : x1] = False
    assert np.array_equal(src[outside], dst[outside])
    assert not np.array_equal(src[~outside], dst[~outside])


def test_restore_box_at_image_edge(data_dir: Path) -> None:
    net = FaceRestorers(data_dir).load("CodeFormer")
    image = face_image()
    out = restore_boxes(image, [(0, 70, 30, 96)], net)  # crop reaches past two edges
    assert out.size == image.size
    assert not np.array_equal(np.asarray(out), np.asarray(image))


def test_visibility(data_dir: Path) -> None:
    net = FaceRestorers(data_dir).load("CodeFormer")
    image = face_image()
    box = (40, 30, 70, 60)
    assert np.array_equal(np.asarray(restore_boxes(image, [box], net, visibility=0.0)), np.asarray(image))
    full = np.asarray(restore_boxes(image, [box], net, visibility=1.0), dtype=np.int16)
    half = np.asarray(restore_boxes(image, [box], net, visibility=0.5), dtype=np.int16)
    src = np.asarray(image, dtype=np.int16)
    # A1111 blends the whole restored image over the original: half-way, up to rounding.
    assert np.abs(half - (src + full) / 2).max() <= 1
    assert np.array_equal(np.asarray(FaceRestorers(data_dir).restore(image, visibility=0.0)), src)


def test_missing_weights_name_the_folder(tmp_path: Path) -> None:
    restorers = FaceRestorers(tmp_path)
    with pytest.raises(MuralistError) as err:
        restorers.restore(face_image(), "CodeFormer")
    msg = str(err.value)
    assert str(tmp_path / "models" / "Codeformer") in msg and "codeformer-v0.1.0.pth" in msg
    with pytest.raises(MuralistError, match=r"GFPGANv1\.4\.pth"):
        restorers.find("GFPGAN")


def test_bad_inputs(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(InvalidRequestError):
        FaceRestorers(data_dir).restore(face_image(), "RestoreFormer")
    with pytest.raises(InvalidRequestError):
        FaceRestorers(data_dir).restore(face_image(), visibility=1.5)
    folder = tmp_path / "other" / "models" / "Codeformer"
    folder.mkdir(parents=True)
    torch.save({"params_ema": {"conv.weight": torch.zeros(1)}}, folder / "codeformer-v0.1.0.pth")
    with pytest.raises(ModelFileError):
        FaceRestorers(tmp_path / "other").load("CodeFormer")


def test_detector_finds_nothing_in_noise() -> None:
    assert faces.detect_faces(Image.new("RGB", (64, 64), (10, 10, 10))) == []


def tiny_gfpgan(**overrides: object) -> GFPGANv1Clean:
    # 64x64 faces in the released layout (different_w, half SFT, stored noise); narrow 1/32 keeps
    # it tiny while the 64x64 level still exercises the channel multiplier.
    torch.manual_seed(0)
    kwargs: dict = dict(out_size=64, num_style_feat=16, channel_multiplier=1, num_mlp=2, narrow=1 / 32)
    model = GFPGANv1Clean(**(kwargs | overrides))
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.add_(torch.randn_like(t) * 0.1)  # noise maps start at zero; fill them too
    return model.eval()


@pytest.fixture(scope="module")
def gfp_state() -> dict[str, torch.Tensor]:
    return tiny_gfpgan().state_dict()


@pytest.fixture()
def gfp_dir(tmp_path: Path, gfp_state: dict[str, torch.Tensor]) -> Path:
    folder = tmp_path / "models" / "GFPGAN"
    folder.mkdir(parents=True)
    torch.save({"params_ema": gfp_state}, folder / "GFPGANv1.4.pth")
    return tmp_path


def test_gfpgan_real_layout() -> None:
    with torch.device("meta"):
        real = GFPGANv1Clean()  # GFPGANer's v1.3/1.4 configuration
        rebuilt = GFPGANv1Clean.from_state_dict(real.state_dict())
    sd = real.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    assert (rebuilt.img_size, rebuilt.different_w, rebuilt.stylegan_decoder.sft_half) == (512, True, True)
    # Sizes that follow from the original's tables: 16 style vectors of 512 from a 256x4x4 code,
    # a U-Net half as wide as the decoder, half SFT, 8 MLP layers and 15 stored noise maps.
    assert shapes["conv_body_first.weight"] == (32, 3, 1, 1)
    assert shapes["final_conv.weight"] == (256, 256, 3, 3)
    assert shapes["final_linear.weight"] == (16 * 512, 256 * 16)
    assert shapes["condition_scale.6.2.weight"] == (32, 32, 3, 3)
    assert (
        shapes["conv_body_down.6.skip.weight"] == (256, 256, 1, 1)
        and "conv_body_down.7.skip.weight" not in sd
    )
    assert shapes["stylegan_decoder.style_convs.13.modulated_conv.weight"] == (1, 64, 64, 3, 3)
    assert shapes["stylegan_decoder.to_rgbs.6.modulated_conv.modulation.weight"] == (64, 512)
    assert shapes["stylegan_decoder.style_mlp.15.weight"] == (512, 512)
    assert shapes["stylegan_decoder.noises.noise14"] == (1, 1, 512, 512)
    assert shapes["stylegan_decoder.constant_input.weight"] == (1, 512, 4, 4)
    assert shapes["toRGB.6.weight"] == (3, 32, 1, 1)
    assert len(sd) == 285
    # ~87.1M stored floats: 348.6 MB in fp32, the size of the released GFPGANv1.4.pth.
    assert sum(v.numel() for v in sd.values()) == 87_143_276
    assert faces.detect_architecture(sd) == "GFPGAN"


def test_gfpgan_from_state_dict_infers_variants() -> None:
    for overrides in ({}, {"sft_half": False}, {"different_w": False}, {"channel_multiplier": 2}):
        sd = tiny_gfpgan(**overrides).state_dict()
        net = faces.build_face_model(sd)
        assert isinstance(net, GFPGANv1Clean)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            image, rgbs = net(x, return_rgb=False, weight=0.5)  # A1111's call; weight is ignored
            again, _ = net(x)
            noisy, _ = net(x, randomize_noise=True)
        assert image.shape == x.shape and rgbs == []
        assert torch.equal(image, again)  # stored noise: reproducible
        assert not torch.equal(image, noisy)


def test_gfpgan_detected_loaded_and_restores(gfp_dir: Path, gfp_state: dict[str, torch.Tensor]) -> None:
    restorers = FaceRestorers(gfp_dir)
    path = restorers.find("gfpgan")
    assert path == gfp_dir / "models" / "GFPGAN" / "GFPGANv1.4.pth"
    assert faces.detect_architecture(faces.load_face_state_dict(path)) == "GFPGAN"
    net = restorers.load("GFPGAN")
    assert isinstance(net, GFPGANv1Clean) and net.img_size == 64
    assert all(torch.equal(net.state_dict()[k], v) for k, v in gfp_state.items())
    assert restorers.load("GFPGAN") is net

    image = face_image()
    box = (40, 30, 70, 60)
    out = restore_boxes(image, [box], net, visibility=1.0)
    src, dst = np.asarray(image), np.asarray(out)
    x0, y0, x1, y1 = face_crop_box(box)
    outside = np.ones(src.shape[:2], bool)
    outside[max(y0, 0) : y1, max(x0, 0) : x1] = False
    assert np.array_equal(src[outside], dst[outside])
    assert not np.array_equal(src[~outside], dst[~outside])
    assert np.array_equal(np.asarray(restore_boxes(image, [box], net)), dst)  # deterministic
    assert np.array_equal(np.asarray(restore_boxes(image, [box], net, visibility=0.0)), src)
    assert np.array_equal(np.asarray(restorers.restore(image, "GFPGAN", visibility=0.0)), src)
    blank = Image.new("RGB", (120, 80), (90, 140, 200))  # no face: unchanged through restore()
    assert np.array_equal(np.asarray(restorers.restore(blank, "GFPGAN")), np.asarray(blank))


def test_gfpgan_bad_files(tmp_path: Path, gfp_state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "models" / "GFPGAN"
    folder.mkdir(parents=True)
    partial = {k: v for k, v in gfp_state.items() if not k.startswith("condition_shift.")}
    torch.save({"params_ema": partial}, folder / "GFPGANv1.4.pth")
    with pytest.raises(ModelFileError, match="lack"):
        FaceRestorers(tmp_path).load("GFPGAN")
    stub = {
        "conv_body_first.weight": torch.zeros(4, 3, 1, 1),
        "stylegan_decoder.constant_input.weight": torch.zeros(1, 4, 4, 4),
    }
    with pytest.raises(ModelFileError, match="not recognised"):
        faces.build_face_model(stub)
    # CodeFormer weights in the GFPGAN folder are named as such.
    torch.save({"params_ema": tiny_codeformer().state_dict()}, folder / "GFPGANv1.4.pth")
    with pytest.raises(ModelFileError, match="CodeFormer weights, not GFPGAN"):
        FaceRestorers(tmp_path).load("GFPGAN")
