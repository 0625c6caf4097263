"""Textual inversion embeddings: every A1111-readable file format, the folder scan and its caching.

Widths follow muralist's tiny models (32 for SD1 and SDXL's clip_l, 64 for SDXL's clip_g);
1024 stands in for SD2.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from muralist.errors import ModelFileError
from muralist.models.hashing import HashCache
from muralist.paths import DataDirs
from muralist.prompts import embeddings as emb_mod
from muralist.prompts.embeddings import Embedding, EmbeddingRegistry, load_embedding

SD1 = {"default": 32}
SD2 = {"default": 1024}
SDXL = {"clip_l": 32, "clip_g": 64}


@pytest.fixture
def dirs(tmp_path: Path) -> DataDirs:
    d = DataDirs.from_options(tmp_path / "data")
    d.embeddings_dir.mkdir(parents=True)
    return d


def a1111_pt(path: Path, vec: torch.Tensor, step: int | None = 500, **kwargs: object) -> Path:
    """What A1111's Embedding.save writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": path.stem,
        "step": step,
        "sd_checkpoint": "abcdef12",
        "sd_checkpoint_name": "tiny-sd1",
    }
    torch.save(data, path, **kwargs)
    return path


def sdxl_file(path: Path, n: int = 2, l_width: int = 32, g_width: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": torch.randn(n, l_width), "clip_g": torch.randn(n, g_width)}, str(path))
    return path


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# -- single files ---------------------------------------------------------------------------


def test_a1111_pt(tmp_path: Path) -> None:
    vec = torch.randn(3, 32)
    path = a1111_pt(tmp_path / "my-style.pt", vec)
    emb = load_embedding(path)
    assert emb.name == "my-style" and emb.path == path
    assert set(emb.vectors) == {"default"}
    assert emb.vector_count == 3 and emb.shape == 32 and not emb.is_sdxl
    assert torch.equal(emb.vectors["default"], vec)
    assert emb.vectors["default"].dtype == torch.float32
    assert emb.shorthash == sha12(path) and emb.sha256.startswith(emb.shorthash)
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (500, "abcdef12", "tiny-sd1")


def test_a1111_pt_trained_parameter_1d_and_legacy_pickle(tmp_path: Path) -> None:
    # Trained embeddings are saved as nn.Parameter; a (width,) vector is one token.
    param = torch.nn.Parameter(torch.randn(32))
    emb = load_embedding(a1111_pt(tmp_path / "param.pt", param, step=None))
    assert emb.vectors["default"].shape == (1, 32) and not emb.vectors["default"].requires_grad
    assert emb.step is None
    # Pre-1.6 torch wrote plain pickles instead of zip files.
    old = a1111_pt(tmp_path / "old.pt", torch.randn(2, 64), _use_new_zipfile_serialization=False)
    assert load_embedding(old).vectors["default"].shape == (2, 64)


def test_safetensors_emb_params(tmp_path: Path) -> None:
    path = tmp_path / "kohya.safetensors"
    vec = torch.randn(4, 32).half()
    save_file({"emb_params": vec}, str(path), metadata={"name": "kohya"})
    emb = load_embedding(path)
    assert emb.vector_count == 4
    assert emb.vectors["default"].dtype == torch.float32
    assert torch.equal(emb.vectors["default"], vec.float())
    assert emb.shorthash == sha12(path)


def test_sdxl_safetensors(tmp_path: Path) -> None:
    path = sdxl_file(tmp_path / "xl-style.safetensors", n=5)
    emb = load_embedding(path)
    assert emb.is_sdxl and set(emb.vectors) == {"clip_l", "clip_g"}
    assert emb.vectors["clip_l"].shape == (5, 32) and emb.vectors["clip_g"].shape == (5, 64)
    assert emb.vector_count == 5 and emb.shape == 96
    assert emb.vector_for(32, "clip_l") is emb.vectors["clip_l"]
    assert emb.vector_for(64, "clip_g") is emb.vectors["clip_g"]
    assert emb.vector_for(64, "clip_l") is None
    assert emb.vector_for(32) is None  # no "default" vectors to fall back on


def test_default_vectors_serve_any_encoder_of_their_width(tmp_path: Path) -> None:
    emb = load_embedding(a1111_pt(tmp_path / "e.pt", torch.randn(2, 32)))
    assert emb.vector_for(32) is emb.vectors["default"]
    assert emb.vector_for(32, "clip_l") is emb.vectors["default"]
    assert emb.vector_for(64, "clip_g") is None


def test_diffusers_bin(tmp_path: Path) -> None:
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": torch.randn(32)}, path)
    emb = load_embedding(path)
    assert emb.name == "learned_embeds"
    assert emb.vectors["default"].shape == (1, 32)


def test_pt_with_one_tensor(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save({"whatever": torch.randn(6, 64)}, path)
    emb = load_embedding(path)
    assert emb.vector_count == 6 and emb.widths == {"default": 64}


@pytest.mark.parametrize(
    ("filename", "data", "needle"),
    [
        (
            "two-terms.pt",
            {"string_to_param": {"*": torch.randn(1, 32), "x": torch.randn(1, 32)}},
            "one entry",
        ),
        ("lora.pt", {"a.weight": torch.randn(2, 2), "b.weight": torch.randn(2, 2)}, "2 tensors"),
        ("nothing.pt", {"name": "x"}, "no tensors"),
        ("ints.pt", {"t": torch.ones(2, 32, dtype=torch.int64)}, "not floats"),
        ("cube.pt", {"t": torch.randn(1, 2, 32)}, "shape (1, 2, 32)"),
        ("bare-tensor.pt", torch.randn(2, 32), "not a dict"),
        ("uneven-xl.pt", {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 64)}, "clip_g has 3"),
    ],
)
def test_unusable_files_are_refused(tmp_path: Path, filename: str, data: object, needle: str) -> None:
    path = tmp_path / filename
    torch.save(data, path)
    with pytest.raises(ModelFileError) as err:
        load_embedding(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_checkpoint_safetensors_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(2, 2) for i in range(5)}, str(path))
    with pytest.raises(ModelFileError, match="5 tensors"):
        load_embedding(path)


def test_wrong_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not an embedding file"):
        load_embedding(tmp_path / "x.ckpt")
    with pytest.raises(ModelFileError, match=r"missing\.pt"):
        load_embedding(tmp_path / "missing.pt")


def test_embedding_checks_its_vectors() -> None:
    with pytest.raises(ValueError):
        Embedding("x", Path("x.pt"), {"clip_l": torch.zeros(1, 32)}, "0" * 12)
    with pytest.raises(ValueError):
        Embedding("x", Path("x.pt"), {"default": torch.zeros(32)}, "0" * 12)
    emb = Embedding("x", Path("x.pt"), {"default": torch.zeros(1, 8, dtype=torch.float16)}, "0" * 12)
    assert emb.vectors["default"].dtype == torch.float32


class _Payload:
    """Unpickling this creates a file: the stand-in for an attacker's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(dirs: DataDirs, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = dirs.embeddings_dir / "evil.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "name": _Payload(marker)}, evil)
    # Control: the payload is live when unpickled without weights_only.
    control = tmp_path / "control-marker"
    control_file = tmp_path / "control.pt"
    torch.save({"x": _Payload(control)}, control_file)
    torch.load(control_file, weights_only=False)
    assert control.exists()

    a1111_pt(dirs.embeddings_dir / "good.pt", torch.randn(1, 32))
    with pytest.raises(ModelFileError, match="refused"):
        load_embedding(evil)
    reg = EmbeddingRegistry(dirs)
    assert list(reg.all()) == ["good"]
    assert [(p, "refused" in why) for p, why in reg.errors()] == [(evil, True)]
    assert not marker.exists()


# -- the registry ---------------------------------------------------------------------------


def test_registry_for_model(dirs: DataDirs) -> None:
    root = dirs.embeddings_dir
    a1111_pt(root / "sd1-style.pt", torch.randn(2, 32))
    save_file({"emb_params": torch.randn(1, 1024)}, str(root / "sd2-style.safetensors"))
    torch.save({"<tok>": torch.randn(64)}, root / "wide.bin")
    sdxl_file(root / "xl" / "xl-style.safetensors")
    reg = EmbeddingRegistry(dirs)
    assert list(reg.all()) == ["sd1-style", "sd2-style", "wide", "xl-style"]
    assert reg.errors() == []

    loaded, skipped = reg.for_model(SD1)
    assert list(loaded) == ["sd1-style"]
    assert skipped["sd2-style"] == "vector width 1024 does not match the model's 32"
    assert skipped["wide"] == "vector width 64 does not match the model's 32"
    assert "SDXL" in skipped["xl-style"] and "32" in skipped["xl-style"]

    loaded, skipped = reg.for_model(SD2)
    assert list(loaded) == ["sd2-style"]
    assert skipped["sd1-style"] == "vector width 32 does not match the model's 1024"
    assert set(skipped) == {"sd1-style", "wide", "xl-style"}

    loaded, skipped = reg.for_model(SDXL)
    assert list(loaded) == ["xl-style"]
    assert set(skipped) == {"sd1-style", "sd2-style", "wide"}
    assert skipped["sd1-style"].startswith("vector width 32 does not match the model's clip_l 32 + clip_g 64")

    _, skipped = reg.for_model({"clip_l": 32, "clip_g": 128})
    assert "clip_g 64" in skipped["xl-style"] and "clip_g 128" in skipped["xl-style"]
    with pytest.raises(ValueError):
        reg.for_model({"clip_l": 32})


def test_registry_ignores_images_hidden_and_empty_files(dirs: DataDirs) -> None:
    root = dirs.embeddings_dir
    a1111_pt(root / "style.pt", torch.randn(1, 32))
    (root / "style.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "style.webp").write_bytes(b"RIFF....WEBP")
    (root / "notes.txt").write_text("hi")
    (root / "._style.pt").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    a1111_pt(root / ".git" / "hidden.pt", torch.randn(1, 32))
    (root / "downloading.safetensors").write_bytes(b"")
    reg = EmbeddingRegistry(dirs)
    assert list(reg.all()) == ["style"]
    assert reg.errors() == []


def test_missing_folder_is_empty(tmp_path: Path) -> None:
    reg = EmbeddingRegistry(DataDirs.from_options(tmp_path / "nowhere"))
    assert reg.all() == {} and reg.errors() == [] and reg.for_model(SD1) == ({}, {})


def test_corrupt_files_are_reported_without_hiding_others(dirs: DataDirs) -> None:
    root = dirs.embeddings_dir
    a1111_pt(root / "a.pt", torch.randn(1, 32))
    good = sdxl_file(root / "b.safetensors")
    (root / "garbage.pt").write_bytes(b"this is not a pickle")
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    zipped = a1111_pt(root / "cut.pt", torch.randn(4, 32))
    zipped.write_bytes(zipped.read_bytes()[:200])
    a1111_pt(root / "z.pt", torch.randn(1, 64))

    reg = EmbeddingRegistry(dirs)
    assert list(reg.all()) == ["a", "b", "z"]
    errors = dict(reg.errors())
    assert set(errors) == {root / "garbage.pt", truncated, zipped}
    for path, reason in errors.items():
        assert str(path) in reason


def test_first_file_with_a_name_wins(dirs: DataDirs) -> None:
    root = dirs.embeddings_dir
    a1111_pt(root / "nested" / "dup.pt", torch.randn(2, 64))
    top = a1111_pt(root / "dup.pt", torch.randn(1, 32))
    sdxl_file(root / "dup.safetensors")
    reg = EmbeddingRegistry(dirs)
    assert reg.all()["dup"].path == top  # a folder's own files first, ".pt" < ".safetensors"
    assert reg.errors() == []


def test_natural_name_order(dirs: DataDirs) -> None:
    for name in ("v10", "V2", "a"):
        a1111_pt(dirs.embeddings_dir / f"{name}.pt", torch.randn(1, 32))
    assert list(EmbeddingRegistry(dirs).all()) == ["a", "V2", "v10"]


def test_rescan_uses_cache(dirs: DataDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    root = dirs.embeddings_dir
    a1111_pt(root / "a.pt", torch.randn(1, 32))
    sdxl_file(root / "b.safetensors")
    bad = root / "bad.pt"
    bad.write_bytes(b"junk")
    reg = EmbeddingRegistry(dirs)
    first = reg.all()
    first_errors = reg.errors()
    assert [p for p, _ in first_errors] == [bad]

    calls: list[Path] = []

    def no_reading(path: Path, **kwargs: object) -> Embedding:
        calls.append(Path(path))
        raise ModelFileError(f"{path}: reread")

    monkeypatch.setattr(emb_mod, "load_embedding", no_reading)
    reg.refresh()
    again = reg.all()
    assert calls == []
    assert again.keys() == first.keys() and all(again[k] is first[k] for k in first)
    assert reg.errors() == first_errors  # a broken file's verdict is cached too

    # A changed file is reread; a new one appears; a deleted one goes away.
    b = root / "b.safetensors"
    sdxl_file(b, n=3)
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 1_000_000))
    a1111_pt(root / "c.pt", torch.randn(1, 32))
    (root / "a.pt").unlink()
    reg.refresh()
    assert list(reg.all()) == []
    assert sorted(calls) == [b, root / "c.pt"]
    assert {p for p, _ in reg.errors()} == {bad, b, root / "c.pt"}


def test_registry_is_lazy_until_refresh(dirs: DataDirs) -> None:
    reg = EmbeddingRegistry(dirs)
    assert reg.all() == {}
    a1111_pt(dirs.embeddings_dir / "late.pt", torch.randn(1, 32))
    assert reg.all() == {}
    reg.refresh()
    assert list(reg.all()) == ["late"]


def test_hashes_come_from_the_shared_cache(dirs: DataDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    path = a1111_pt(dirs.embeddings_dir / "a.pt", torch.randn(1, 32))
    cache = HashCache(dirs.cache_dir / "hashes.json")
    assert EmbeddingRegistry(dirs, cache).all()["a"].shorthash == sha12(path)

    def no_hashing(path: object) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr(emb_mod, "sha256_file", no_hashing)
    # A fresh registry (as after a restart) parses the file again but reuses the saved hash.
    fresh = EmbeddingRegistry(dirs, HashCache(dirs.cache_dir / "hashes.json"))
    assert fresh.all()["a"].shorthash == sha12(path)


def test_concurrent_use(dirs: DataDirs) -> None:
    for i in range(5):
        a1111_pt(dirs.embeddings_dir / f"e{i}.pt", torch.randn(1, 32))
    reg = EmbeddingRegistry(dirs)
    results: list[list[str]] = []
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                reg.refresh()
                results.append(list(reg.for_model(SD1)[0]))
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(r == [f"e{i}" for i in range(5)] for r in results) and len(results) == 80
