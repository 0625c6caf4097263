"""Infotext layout, parsing and image metadata, checked against A1111's rules."""

from __future__ import annotations

import io
import random
import struct

import pytest
from PIL import Image, features

from muralist.errors import MuralistError
from muralist.infotext import (
    A1111_PARAM_RE,
    INFOTEXT_ORDER,
    build_infotext,
    parse_infotext,
    png_bytes,
    quote,
    read_infotext,
    save_png,
)

PROMPT = "a cat, sitting on a mat, (masterpiece:1.2)\nsecond line: with a colon"
NEGATIVE = "ugly, blurry\nbad hands, extra fingers"
LORA_HASHES = 'detail: 0123456789ab, "odd" name: fedcba987654'

PARAMS: dict[str, object] = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7.0,
    "Seed": 1234567890,
    "Size": "512x768",
    "Model hash": "abcdef1234",
    "Model": "sd15-pruned",
    "Denoising strength": 0.45,
    "Clip skip": 2,
    "RNG": "CPU",
    "Hires upscale": 2,
    "Hires upscaler": "Latent",
    "Lora hashes": LORA_HASHES,
    "TI hashes": "easyneg: 1234abcd5678",
    "Version": "v1.10.1",
}

# The order A1111's create_infotext writes PARAMS in.
EXPECTED_KEYS = [
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "Denoising strength",
    "Clip skip",
    "RNG",
    "Hires upscale",
    "Hires upscaler",
    "Lora hashes",
    "TI hashes",
    "Version",
]


def _param_keys(text: str) -> list[str]:
    return [k for k, _ in A1111_PARAM_RE.findall(text.split("\n")[-1])]


def test_layout() -> None:
    text = build_infotext("a cat", "ugly", {"Steps": 20, "Sampler": "Euler a", "Size": "512x512"})
    assert text == "a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, Size: 512x512"
    text = build_infotext("a cat", "", {"Steps": 20, "Seed": None, "Size": "512x512"})
    assert text == "a cat\nSteps: 20, Size: 512x512"


def test_quote_rules() -> None:
    assert quote("Euler a") == "Euler a"
    assert quote(7.0) == "7.0"
    assert quote("a, b") == '"a, b"'
    assert quote("a: b") == '"a: b"'
    assert quote("a\nb") == '"a\\nb"'
    assert quote('say "hi", café') == '"say \\"hi\\", café"'  # JSON, non-ASCII kept


def test_round_trip_with_commas_multiline_negative_and_lora_hashes() -> None:
    text = build_infotext(PROMPT, NEGATIVE, PARAMS)
    assert f'Lora hashes: "{LORA_HASHES.replace(chr(34), chr(92) + chr(34))}"' in text

    parsed = parse_infotext(text)
    assert parsed["Prompt"] == PROMPT
    assert parsed["Negative prompt"] == NEGATIVE
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768"
    assert "Size" not in parsed  # A1111 keeps only the split form
    for key, value in PARAMS.items():
        if key != "Size":
            assert parsed[key] == str(value), key

    # Every key is found by A1111's own regex, in A1111's order.
    assert _param_keys(text) == EXPECTED_KEYS


def test_order_follows_a1111_for_shuffled_dict() -> None:
    items = list(PARAMS.items())
    extras = [k for k in EXPECTED_KEYS if k not in INFOTEXT_ORDER and k != "Version"]
    for trial in range(20):
        random.Random(trial).shuffle(items)
        text = build_infotext("p", "", dict(items))
        keys = _param_keys(text)
        fixed = [k for k in keys if k in INFOTEXT_ORDER]
        assert fixed == sorted(fixed, key=INFOTEXT_ORDER.index)
        # Extra params follow the fixed ones, in the order given, and Version ends the line.
        given_extras = [k for k, _ in items if k in extras]
        assert keys == fixed + given_extras + ["Version"]


def test_extra_key_equal_to_its_value_is_written_alone() -> None:
    text = build_infotext("p", "", {"Steps": 20, "Seed": 1, "Size": "8x8", "Flag": "Flag"})
    assert text.endswith("Size: 8x8, Flag")


def test_last_line_needs_three_params() -> None:
    parsed = parse_infotext("a photo\nSteps: 20, Seed: 1")
    assert parsed == {"Prompt": "a photo\nSteps: 20, Seed: 1", "Negative prompt": ""}
    parsed = parse_infotext("Steps: 20, Seed: 1, Size: 64x32")
    assert parsed == {
        "Prompt": "",
        "Negative prompt": "",
        "Steps": "20",
        "Seed": "1",
        "Size-1": "64",
        "Size-2": "32",
    }


def test_png_round_trip(tmp_path) -> None:
    text = build_infotext(PROMPT, NEGATIVE, PARAMS)
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    path = save_png(image, tmp_path / "out" / "a.png", text)
    assert path == tmp_path / "out" / "a.png"
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]  # no temporary left behind

    assert read_infotext(path) == text
    assert read_infotext(str(path)) == text
    assert read_infotext(path.read_bytes()) == text
    with Image.open(path) as reopened:
        assert reopened.info["parameters"] == text
        assert reopened.size == (16, 8)
        assert read_infotext(reopened) == text


def test_png_non_latin_text_uses_itxt() -> None:
    text = build_infotext("猫, かわいい", "", {"Steps": 20, "Seed": 1, "Size": "8x8"})
    data = png_bytes(Image.new("RGB", (8, 8)), text)
    assert b"iTXtparameters" in data
    assert read_infotext(data) == text
    assert Image.open(io.BytesIO(data)).info["parameters"] == text


def test_image_without_infotext() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    assert read_infotext(buffer.getvalue()) is None


def _piexif_style_exif(text: str) -> bytes:
    """EXIF as A1111 writes it with piexif: big-endian TIFF, UserComment = UNICODE + UTF-16BE."""
    comment = b"UNICODE\x00" + text.encode("utf-16-be")
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, 26) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(comment), 44) + struct.pack(">I", 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment
    assert len(b"MM\x00\x2a") + 4 + len(ifd0) == 26 and 26 + len(exif_ifd) == 44
    return b"Exif\x00\x00" + tiff


def _saved(fmt: str, exif: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def test_jpeg_user_comment_as_a1111_writes_it() -> None:
    text = build_infotext("café, crème", "blurry", {"Steps": 20, "Seed": 3, "Size": "8x8"})
    assert read_infotext(_saved("JPEG", _piexif_style_exif(text))) == text


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WEBP")
def test_webp_user_comment_as_a1111_writes_it() -> None:
    text = build_infotext("a dog", "", {"Steps": 20, "Seed": 3, "Size": "8x8"})
    assert read_infotext(_saved("WEBP", _piexif_style_exif(text))) == text


def test_little_endian_exif_user_comment() -> None:
    text = "a dog\nSteps: 20, Seed: 3, Size: 8x8"
    exif = Image.Exif()
    exif.endian = "<"
    exif[0x8769] = {0x9286: b"UNICODE\x00" + text.encode("utf-16-le")}
    assert read_infotext(_saved("JPEG", exif.tobytes())) == text


def test_not_an_image(tmp_path) -> None:
    with pytest.raises(MuralistError, match="is not an image"):
        read_infotext(b"Steps: 20, Seed: 1, Size: 8x8")
    bogus = tmp_path / "notes.png"
    bogus.write_text("hello")
    with pytest.raises(MuralistError, match="is not an image"):
        read_infotext(bogus)
    with pytest.raises(MuralistError):
        read_infotext(tmp_path / "missing.png")
