"""The `muralist` command as a newcomer uses it: generate, png-info, models list, and clear errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from muralist.infotext import A1111_PARAM_RE
from tests.conftest import link_tree


def muralist(*args: str, data: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MURALIST_DATA_DIR=str(data))
    return subprocess.run(
        [sys.executable, "-m", "muralist.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture()
def data(a1111_models: Path, tmp_path: Path) -> Path:
    """A private copy of the A1111 folder, so tests may add broken files to it."""
    root = tmp_path / "data"
    link_tree(a1111_models / "models", root / "models")
    return root


def test_generate_saves_a1111_named_png_with_infotext(data: Path) -> None:
    out = muralist(
        "generate", "a lighthouse, stormy sea", "--model", "tiny-sd15.safetensors", "--seed", "321",
        "--width", "64", "--height", "64", "--steps", "3", "--batch-size", "2", "--sampler", "DPM++ 2M Karras", data=data,
    )
    assert out.returncode == 0, out.stderr
    paths = [Path(p) for p in out.stdout.split()]
    assert [p.name for p in paths] == ["00000-321.png", "00001-322.png"]
    assert paths[0].parent.parent == data / "outputs" / "txt2img-images"
    info = muralist("png-info", str(paths[1]), data=data)
    assert info.returncode == 0
    lines = info.stdout.strip().split("\n")
    assert lines[0] == "a lighthouse, stormy sea"
    params = dict(m.groups() for m in A1111_PARAM_RE.finditer(lines[-1]))
    assert params["Seed"] == "322" and params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
    assert params["Model"] == "tiny-sd15"


def test_models_list_shows_title_family_hash(data: Path) -> None:
    out = muralist("models", "list", data=data)
    assert out.returncode == 0
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "SDXL" in rows["tiny-sdxl.safetensors"]
    assert "SD1.x inpainting" in rows["tiny-sd15-inpainting.safetensors"]
    assert "SD2.x" in rows["tiny-sd21.safetensors"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model", "tinny-sd15"], "did you mean: tiny-sd15"),
        (["--sampler", "Eulerr a"], "unknown sampler 'Eulerr a'; did you mean: Euler a"),
        (["--width", "100"], "width: must be a multiple of 8"),
        (["--steps", "0"], "steps:"),
        (["--cfg-scale", "-3"], "cfg_scale:"),
        (["--vae", "nope"], "unknown VAE 'nope'"),
    ],
)
def test_user_errors_are_one_line_exit_2(data: Path, args: list[str], expected: str) -> None:
    out = muralist("generate", "x", "--width", "64", "--height", "64", "--steps", "1", *args, data=data)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert expected in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_truncated_checkpoint_is_one_clear_line(data: Path) -> None:
    good = data / "models" / "Stable-diffusion" / "tiny-sd15.safetensors"
    bad = data / "models" / "Stable-diffusion" / "broken.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = muralist("generate", "x", "--model", "broken", "--steps", "1", "--width", "64", "--height", "64", data=data)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "broken.safetensors" in out.stderr and ("corrupt" in out.stderr or "truncated" in out.stderr)
    listing = muralist("models", "list", data=data)
    assert listing.returncode == 0 and "skipped" in listing.stderr and "broken.safetensors" in listing.stderr


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(data: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = data / "models" / "Stable-diffusion" / "evil.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload(str(marker))}, f)
    out = muralist("generate", "x", "--model", "evil", "--steps", "1", "--width", "64", "--height", "64", data=data)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "run code" in out.stderr
    assert not marker.exists()


def test_png_info_on_a_file_without_infotext(tmp_path: Path) -> None:
    from PIL import Image

    p = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(p)
    out = muralist("png-info", str(p), data=tmp_path)
    assert out.returncode == 2 and "no A1111 infotext" in out.stderr


def test_empty_data_folder_says_where_to_put_models(tmp_path: Path) -> None:
    out = muralist("generate", "x", "--steps", "1", "--width", "64", "--height", "64", data=tmp_path / "fresh")
    assert out.returncode == 2
    assert "Stable-diffusion" in out.stderr and "Traceback" not in out.stderr


def test_inpaint_from_the_command_line(data: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    src = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    src.save(tmp_path / "src.png")
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((24, 24, 40, 40), fill=255)
    mask.save(tmp_path / "mask.png")
    out = muralist("generate", "a door", "--init-image", str(tmp_path / "src.png"), "--mask", str(tmp_path / "mask.png"),
                   "--width", "64", "--height", "64", "--steps", "4", "--mask-blur", "0", "--whole-picture",
                   "--model", "tiny-sd15.safetensors", data=data)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.split()[0])
    assert path.parent.parent.name == "img2img-images"
    img = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(img[:16], np.asarray(src)[:16])
    assert "Masked content: original" in muralist("png-info", str(path), data=data).stdout


def test_extras_and_xyz_from_the_command_line(data: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(4).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    out = muralist("extras", str(tmp_path / "small.png"), "--upscaler", "Lanczos", "--scale", "2", "--out", str(tmp_path / "x"), data=data)
    assert out.returncode == 0, out.stderr
    assert Image.open(out.stdout.split()[0]).size == (80, 48) and "Postprocess upscaler: Lanczos" in out.stderr
    bad = muralist("extras", str(tmp_path / "small.png"), "--upscaler", "Lanczoss", data=data)
    assert bad.returncode == 2 and "Lanczos" in bad.stderr and "Traceback" not in bad.stderr
    xyz = muralist("generate", "a cat", "--width", "64", "--height", "64", "--steps", "2", "--model", "tiny-sd15.safetensors",
                   "--script-name", "X/Y/Z plot", "--script-args", '["Steps", "1,2", "", "Nothing", "", "", "Nothing", "", ""]',
                   "--out", str(tmp_path / "g"), data=data)
    assert xyz.returncode == 0, xyz.stderr
    assert len(xyz.stdout.split()) == 3  # the grid, then the two cells
