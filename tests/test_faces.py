"""Face restoration: spandrel networks with tiny random weights in the released key layouts, in
A1111's folders; RetinaFace-aligned (A1111's pipeline) and Haar fallback paths."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muralist.errors import InvalidRequestError, ModelFileError, MuralistError
from muralist.upscale import faces
from muralist.upscale.faces import FaceRestorers, face_crop_box, restore_boxes

TINY_CF = dict(
    img_size=16, nf=32, ch_mult=(1, 1, 2), res_blocks=1, attn_resolutions=(4,), codebook_size=16,
    emb_dim=32, dim_embd=32, n_layers=1, connect_list=("8", "16"),
)  # fmt: skip


def _randomize(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * scale)  # non-trivial weights (GFPGAN noise maps too)
    return model.eval()


def tiny_codeformer() -> torch.nn.Module:
    """16x16 faces, 4x4 latent, fusion at 8 and 16: every structural feature of the real one, tiny."""
    return _randomize(faces.codeformer_net(**TINY_CF), 0.05)


def tiny_gfpgan(**overrides: object) -> torch.nn.Module:
    # 64x64 faces in the released layout (different_w, half SFT, stored noise); narrow 1/32 keeps
    # it tiny while the 64x64 level still exercises the channel multiplier.
    sizes: dict = dict(out_size=64, num_style_feat=16, channel_multiplier=1, num_mlp=2, narrow=1 / 32)
    return _randomize(faces.gfpgan_net(**(sizes | overrides)), 0.1)


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


def spandrel_class(arch: str) -> type:
    from spandrel import MAIN_REGISTRY

    faces._registry()
    return type(MAIN_REGISTRY.get(arch).architecture).__orig_bases__[0].__args__[0]  # Architecture[T]


def test_released_codeformer_is_spandrels_own() -> None:
    with torch.device("meta"):
        real = faces.codeformer_net()
    assert type(real) is spandrel_class("CodeFormer")
    sizes = faces._codeformer_sizes(real.state_dict())
    assert sizes["img_size"] == 512 and sizes["ch_mult"] == (1, 2, 2, 4, 4, 8) and sizes["n_layers"] == 9
    # The structural rule used for other sizes reproduces the release's hard-coded tables.
    conn = list(real.fuse_encoder_block)
    assert faces._fusion_blocks(real, 512, 16, conn) == (real.fuse_encoder_block, real.fuse_generator_block)
    assert 90e6 < sum(p.numel() for p in real.parameters()) < 100e6


def test_detect_and_load_from_a1111_folder(data_dir: Path, cf_state: dict[str, torch.Tensor]) -> None:
    restorers = FaceRestorers(data_dir)
    path = restorers.find("codeformer")
    assert path == data_dir / "models" / "Codeformer" / "codeformer-v0.1.0.pth"
    sd = faces.load_face_state_dict(path)
    assert faces.detect_architecture(sd) == "CodeFormer"
    net = restorers.load("CodeFormer")
    assert isinstance(net.model, spandrel_class("CodeFormer")) and net.size == 16 and net.arch == "CodeFormer"
    assert all(torch.equal(net.model.state_dict()[k], v) for k, v in cf_state.items())
    assert restorers.load("CodeFormer") is net  # cached


def test_any_pth_in_folder_is_used(tmp_path: Path, cf_state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "models" / "Codeformer"
    folder.mkdir(parents=True)
    torch.save({"params": cf_state}, folder / "my-faces.pth")
    assert FaceRestorers(tmp_path).load("CodeFormer").arch == "CodeFormer"


def test_fidelity_weight_reaches_network(cf_state: dict[str, torch.Tensor]) -> None:
    net = faces.build_face_model(cf_state)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out0, out1 = net(x, 0.0), net(x, 1.0)
    assert out0.shape == x.shape
    assert not torch.allclose(out0, out1)


def test_no_face_leaves_image_unchanged_and_warns(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = Image.new("RGB", (120, 80), (90, 140, 200))
    restorers = FaceRestorers(data_dir)
    with caplog.at_level(logging.WARNING, logger="muralist.upscale.faces"):
        out, warnings = restorers.restore_with_warnings(image, "CodeFormer", visibility=1.0, weight=0.5)
    assert out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(image))
    # Without RetinaFace's weights: the Haar path, and a warning naming the files and the folder.
    assert len(warnings) == 1 and "detection_Resnet50_Final.pth" in warnings[0]
    assert "parsing_parsenet.pth" in warnings[0] and str(data_dir / "models" / "GFPGAN") in warnings[0]
    assert warnings[0] in caplog.text


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
    with pytest.raises(ModelFileError, match="not a face-restoration model"):
        FaceRestorers(tmp_path / "other").load("CodeFormer")
    (folder / "codeformer-v0.1.0.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError):
        FaceRestorers(tmp_path / "other").load("CodeFormer")


def test_detector_finds_nothing_in_noise() -> None:
    assert faces.detect_faces(Image.new("RGB", (64, 64), (10, 10, 10))) == []


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
        real = faces.gfpgan_net()  # spandrel's defaults: GFPGANer's v1.3/1.4 configuration
    sd = real.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert faces._gfpgan_sizes(sd) | {"input_is_latent": True} == {
        "out_size": 512, "num_style_feat": 512, "channel_multiplier": 2, "num_mlp": 8,
        "input_is_latent": True, "different_w": True, "narrow": 1, "sft_half": True,
    }  # fmt: skip
    # Sizes of the released file: 16 style vectors of 512 from a 256x4x4 code, a U-Net half as
    # wide as the decoder, half SFT, 8 MLP layers and 15 stored noise maps.
    assert shapes["conv_body_first.weight"] == (32, 3, 1, 1)
    assert shapes["final_linear.weight"] == (16 * 512, 256 * 16)
    assert shapes["stylegan_decoder.style_convs.13.modulated_conv.weight"] == (1, 64, 64, 3, 3)
    assert shapes["stylegan_decoder.noises.noise14"] == (1, 1, 512, 512)
    assert len(sd) == 285
    # ~87.1M stored floats: 348.6 MB in fp32, the size of the released GFPGANv1.4.pth.
    assert sum(v.numel() for v in sd.values()) == 87_143_276
    assert faces.detect_architecture(sd) == "GFPGAN"


def test_gfpgan_from_state_dict_infers_variants() -> None:
    for overrides in ({}, {"sft_half": False}, {"different_w": False}, {"channel_multiplier": 2}):
        sd = tiny_gfpgan(**overrides).state_dict()
        net = faces.build_face_model(sd)
        assert isinstance(net.model, spandrel_class("GFPGAN")) and net.size == 64
        assert all(torch.equal(net.model.state_dict()[k], v) for k, v in sd.items())
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            image, again = net(x), net(x)
            noisy = net.model(x, return_rgb=False, randomize_noise=True)[0]
        assert image.shape == x.shape
        assert torch.equal(image, again)  # stored noise: reproducible
        assert not torch.equal(image, noisy)


def test_gfpgan_detected_loaded_and_restores(gfp_dir: Path, gfp_state: dict[str, torch.Tensor]) -> None:
    restorers = FaceRestorers(gfp_dir)
    path = restorers.find("gfpgan")
    assert path == gfp_dir / "models" / "GFPGAN" / "GFPGANv1.4.pth"
    assert faces.detect_architecture(faces.load_face_state_dict(path)) == "GFPGAN"
    net = restorers.load("GFPGAN")
    assert net.arch == "GFPGAN" and net.size == 64
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
    assert np.array_equal(np.asarray(restorers.restore(image, "GFPGAN", visibility=0.0)), src)
    blank = Image.new("RGB", (120, 80), (90, 140, 200))  # no face: unchanged through restore()
    assert np.array_equal(np.asarray(restorers.restore(blank, "GFPGAN")), np.asarray(blank))


def test_gfpgan_bad_files(tmp_path: Path, gfp_state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "models" / "GFPGAN"
    folder.mkdir(parents=True)
    partial = {k: v for k, v in gfp_state.items() if not k.startswith("condition_shift.")}
    torch.save({"params_ema": partial}, folder / "GFPGANv1.4.pth")
    with pytest.raises(ModelFileError, match="lacks tensors"):
        FaceRestorers(tmp_path).load("GFPGAN")
    # CodeFormer weights in the GFPGAN folder are named as such.
    torch.save({"params_ema": tiny_codeformer().state_dict()}, folder / "GFPGANv1.4.pth")
    with pytest.raises(ModelFileError, match="CodeFormer weights, not GFPGAN"):
        FaceRestorers(tmp_path).load("GFPGAN")


# ---------------------------------------------------------------------------------------------------
# A1111's aligned pipeline: RetinaFace + 5-point alignment + (ParseNet) mask paste-back
# ---------------------------------------------------------------------------------------------------

SIDE = 256
BLOB = (150, 118)  # where the synthetic face is, in image pixels
PRIOR_PX = 512 * SIDE / 640  # the 512 anchor, in image pixels (A1111 detects at short side 640)
EYE_GAP = 32.0  # px between the eyes in the image -> the aligned crop spans 512 * 32 / 126 ~ 130 px


def landmark_offsets() -> np.ndarray:
    """Where the 5 landmarks sit around the detected centre: the FFHQ template, shrunk."""
    t = faces.FFHQ_TEMPLATE_512
    return (t - 256.0) * EYE_GAP / float(t[1, 0] - t[0, 0])


def shaped_retinaface() -> dict[str, torch.Tensor]:
    """Tiny-effort RetinaFace weights in the released key layout, shaped so that it "sees" a face
    where the image is brightest: every conv is zero and every BatchNorm the identity except one
    path carrying the mean brightness through the ResNet-50 shortcuts, the FPN and SSH to the
    stride-32 class head, where the 512 anchor scores it; landmarks come from the head's bias."""
    sd = faces.RetinaFace().state_dict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        v.fill_(1.0) if v.ndim == 1 and k.endswith((".weight", "running_var")) else v.zero_()
    sd["body.conv1.weight"][0] = 1 / (3 * 49)  # channel 0: local mean of the BGR-minus-mean input
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        sd[f"body.{layer}.0.downsample.0.weight"][0, 0] = 1.0
    for i in (1, 2, 3):
        sd[f"fpn.output{i}.0.weight"][0, 0] = 1.0
        sd[f"ssh{i}.conv3X3.0.weight"][0, 0, 1, 1] = 1.0
    for m in ("merge1", "merge2"):
        sd[f"fpn.{m}.0.weight"][0, 0, 1, 1] = 1.0
    for level in range(3):
        sd[f"ClassHead.{level}.conv1x1.bias"][0::2] = 20.0  # "no face" everywhere ...
    sd["ClassHead.2.conv1x1.bias"][2] = 0.0  # ... but the stride-32, 512-px anchor (anchor 1)
    sd["ClassHead.2.conv1x1.weight"][3, 0] = 0.1  # scores brightness: 0.1 * f - 6
    sd["ClassHead.2.conv1x1.bias"][3] = -6.0
    # Landmark offsets are predicted in units of 0.1 x the anchor size.
    sd["LandmarkHead.2.conv1x1.bias"][10:20] = torch.from_numpy(
        landmark_offsets().reshape(-1) / (0.1 * PRIOR_PX)
    )
    return {f"module.{k}": v for k, v in sd.items()}  # saved from DataParallel, as released


def face_scene() -> Image.Image:
    """A dark picture with one bright, textured, face-sized blob."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    r = np.hypot(xx - BLOB[0], yy - BLOB[1])
    light = 10 + 240 * np.clip(1 - r / 70, 0, 1)
    texture = np.random.default_rng(2).integers(-8, 8, (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(light[..., None] + texture, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retinaface") / "detection_Resnet50_Final.pth"
    torch.save(shaped_retinaface(), path)
    return path


def test_retinaface_detects_the_face(detector_file: Path) -> None:
    net = faces.RetinaFace()
    net.load_state_dict(faces.load_face_state_dict(detector_file))
    found = net.eval().detect(np.asarray(face_scene()))
    assert len(found) == 1  # one face, overlapping candidates suppressed
    box, score, points = found[0]
    assert score > 0.97
    centre = (box[:2] + box[2:]) / 2
    assert np.hypot(*(centre - BLOB)) < 20  # found where the face is
    assert np.allclose(box[2:] - box[:2], PRIOR_PX, atol=0.5)
    assert np.allclose(points - centre, landmark_offsets(), atol=0.5)  # decoded as encoded


def aligned_setup(tmp_path: Path, gfp_state: dict[str, torch.Tensor], detector_file: Path) -> Path:
    folder = tmp_path / "models" / "GFPGAN"
    folder.mkdir(parents=True)
    torch.save({"params_ema": gfp_state}, folder / "GFPGANv1.4.pth")
    (folder / faces.DETECTION_FILE).symlink_to(detector_file)
    return tmp_path


def changed_region(before: Image.Image, after: Image.Image) -> np.ndarray:
    return np.any(np.asarray(before) != np.asarray(after), axis=2)


def test_aligned_restore_changes_only_the_face(
    tmp_path: Path, gfp_state: dict[str, torch.Tensor], detector_file: Path
) -> None:
    root = aligned_setup(tmp_path, gfp_state, detector_file)
    restorers = FaceRestorers(root)
    image = face_scene()
    out, warnings = restorers.restore_with_warnings(image, "GFPGAN")
    assert warnings == [] and restorers.alignment_warning() is None
    changed = changed_region(image, out)
    assert changed.sum() > 2000  # the face was restored
    ys, xs = np.nonzero(changed)
    assert np.hypot(xs.mean() - BLOB[0], ys.mean() - BLOB[1]) < 20  # around the face ...
    # ... and inside the aligned crop's square (about 130 px wide) warped back: nothing else moved.
    half = 512 * EYE_GAP / 126 / 2 + 16
    assert xs.min() > BLOB[0] - half and xs.max() < BLOB[0] + half
    assert ys.min() > BLOB[1] - half - 10 and ys.max() < BLOB[1] + half + 10
    # Visibility blends as on the Haar path; 0 leaves the image alone.
    assert np.array_equal(np.asarray(restorers.restore(image, "GFPGAN", visibility=0.0)), np.asarray(image))


def test_aligned_restore_with_parsenet_mask(
    tmp_path: Path, gfp_state: dict[str, torch.Tensor], detector_file: Path
) -> None:
    root = aligned_setup(tmp_path, gfp_state, detector_file)
    image = face_scene()
    square = FaceRestorers(root).restore(image, "GFPGAN")
    # A random ParseNet whose mask head says "skin" everywhere: the face mask is then the aligned
    # square less facexlib's 10 px border, blurred -- a different paste than the eroded square.
    parse = faces.ParseNet()
    _randomize(parse, 0.01)
    sd = parse.state_dict()
    sd["out_mask_conv.conv2d.weight"].zero_()
    sd["out_mask_conv.conv2d.bias"].zero_()
    sd["out_mask_conv.conv2d.bias"][1] = 10.0
    torch.save(sd, root / "models" / "GFPGAN" / faces.PARSING_FILE)
    masked = FaceRestorers(root).restore(image, "GFPGAN")
    assert not np.array_equal(np.asarray(masked), np.asarray(square))
    changed = changed_region(image, masked)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 1000 and np.hypot(xs.mean() - BLOB[0], ys.mean() - BLOB[1]) < 20
    assert not changed[:20].any() and not changed[-20:].any()  # far from the face: untouched
    assert not changed[:, :40].any() and not changed[:, -20:].any()


def test_wrong_detector_file_is_named(tmp_path: Path, gfp_state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path / "models" / "GFPGAN"
    folder.mkdir(parents=True)
    torch.save({"params_ema": gfp_state}, folder / "GFPGANv1.4.pth")
    torch.save({"params_ema": gfp_state}, folder / faces.DETECTION_FILE)  # GFPGAN under the detector's name
    with pytest.raises(ModelFileError, match=r"replace it with facexlib's detection_Resnet50_Final\.pth"):
        FaceRestorers(tmp_path).restore(face_scene(), "GFPGAN")
    # The detector's file is never taken for the restorer's own weights.
    (folder / "GFPGANv1.4.pth").unlink()
    with pytest.raises(MuralistError, match="weights not found"):
        FaceRestorers(tmp_path).find("GFPGAN")


def test_upscaler_in_a_face_folder_is_named(tmp_path: Path) -> None:
    from spandrel.architectures.Compact import Compact

    sd = Compact(num_feat=8, num_conv=2, upscale=2).state_dict()  # a tiny Real-ESRGAN "compact" upscaler
    for folder, file in (("GFPGAN", "GFPGANv1.4.pth"), ("Codeformer", "codeformer-v0.1.0.pth")):
        (tmp_path / "models" / folder).mkdir(parents=True)
        torch.save(sd, tmp_path / "models" / folder / file)
    with pytest.raises(ModelFileError, match="Compact, which is not a face-restoration model.*models/ESRGAN"):
        FaceRestorers(tmp_path).load("GFPGAN")
    with pytest.raises(ModelFileError, match="holds Compact weights, not CodeFormer.*codeformer-v0.1.0.pth"):
        FaceRestorers(tmp_path).load("CodeFormer")


def test_restoreformer_file_serves_as_gfpgan(tmp_path: Path) -> None:
    from spandrel.architectures.RestoreFormer import RestoreFormer

    # spandrel's loader reads RestoreFormer's widths from the tensors; 32 channels keep it small.
    torch.manual_seed(0)
    net = RestoreFormer(n_embed=16, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1,
                        z_channels=32, head_size=2)  # fmt: skip
    folder = tmp_path / "models" / "GFPGAN"
    folder.mkdir(parents=True)
    torch.save({"params_ema": _randomize(net, 0.02).state_dict()}, folder / "RestoreFormer.pth")
    restorers = FaceRestorers(tmp_path)
    loaded = restorers.load("GFPGAN")
    assert loaded.arch == "RestoreFormer" and loaded.size == 512
    image = face_image()
    out = restorers.restore(image, "GFPGAN")  # Haar finds nothing in noise: unchanged
    assert np.array_equal(np.asarray(out), np.asarray(image))
    restored = restore_boxes(image, [(40, 30, 70, 60)], loaded)
    assert not np.array_equal(np.asarray(restored), np.asarray(image))
