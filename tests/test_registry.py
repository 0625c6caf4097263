"""Model files, hashes and the checkpoint/VAE registry, on tiny synthetic A1111-layout files."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from muralist.errors import ModelFileError, MuralistError, NotFoundError
from muralist.models import files, hashing
from muralist.models.family import Family, ModelKind
from muralist.models.registry import ModelRegistry
from muralist.paths import DataDirs

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TE = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TE = "cond_stage_model.model.token_embedding.weight"
XL_TE1 = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
XL_TE2 = "conditioner.embedders.1.model.positional_embedding"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def sd_state(family: str = "sd1", inpainting: bool = False, pad: int = 0, seed: int = 0) -> dict:
    """A state dict with just the keys family detection reads (plus optional padding bytes)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        UNET_IN: torch.randn(8, 9 if inpainting else 4, 3, 3, generator=g),
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 4, 3, 3, generator=g),
    }
    if family == "sd1":
        sd[SD1_TE] = torch.randn(77, 8, generator=g)
    elif family == "sd2":
        sd[SD2_TE] = torch.randn(49408, 1, generator=g)
    elif family == "sdxl":
        sd[XL_TE1] = torch.randn(77, 8, generator=g)
        sd[XL_TE2] = torch.randn(77, 8, generator=g)
    if pad:
        sd["model.diffusion_model.pad"] = torch.randn(pad, generator=g)
    return sd


def write_safetensors(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)
    return path


def write_ckpt(path: Path, sd: dict, zip_format: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The A1111-era layout: weights wrapped in "state_dict" next to training counters.
    torch.save({"state_dict": sd, "global_step": 1234}, path, _use_new_zipfile_serialization=zip_format)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> DataDirs:
    d = DataDirs.from_options(data_dir=tmp_path / "data")
    d.ensure()
    return d


@pytest.fixture
def only_weights_only_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything calls torch.load without weights_only=True."""
    real = torch.load

    def guarded(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load called without weights_only=True"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)


# -- hashes ------------------------------------------------------------------------------------


def test_autov2_legacy_and_title_follow_a1111(dirs: DataDirs) -> None:
    path = write_safetensors(dirs.ckpt_dir / "big.safetensors", sd_state(pad=300_000))
    data = path.read_bytes()
    assert len(data) > 0x110000  # the legacy hash reads 64 KiB at 1 MiB
    sha = hashlib.sha256(data).hexdigest()

    info = ModelRegistry(dirs).find_checkpoint("big.safetensors")
    assert info.sha256 == sha == hashing.sha256_file(path)
    assert info.shorthash == sha[:10]
    assert info.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert info.title == f"big.safetensors [{sha[:10]}]"
    assert info.size == len(data)


def test_legacy_hash_of_missing_file_is_nofile(tmp_path: Path) -> None:
    assert hashing.legacy_hash(tmp_path / "nope.safetensors") == "NOFILE"


def test_addnet_hash_skips_header(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "lora.safetensors", {"w": torch.ones(16)}, {"ss_tag": "x"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert hashing.addnet_hash_safetensors(path) == hashlib.sha256(data[8 + n :]).hexdigest()[:12]
    # Editing metadata changes the file but not the tensor data, so not the hash.
    other = write_safetensors(tmp_path / "lora2.safetensors", {"w": torch.ones(16)}, {"ss_tag": "changed"})
    assert hashing.addnet_hash_safetensors(other) == hashing.addnet_hash_safetensors(path)
    assert files.safetensors_metadata(path) == {"ss_tag": "x"}


def test_hash_cache_survives_corruption_and_writes_valid_json(tmp_path: Path) -> None:
    cache_file = tmp_path / "cache" / "hashes.json"
    cache_file.parent.mkdir()
    cache_file.write_text("{not json")
    model = tmp_path / "m.bin"
    model.write_bytes(b"abc")
    cache = hashing.HashCache(cache_file)
    threads = [threading.Thread(target=cache.get, args=(model, f"f{i}", lambda i=i: i + 1)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = json.loads(cache_file.read_text())
    entry = saved[os.path.abspath(model)]
    assert entry["size"] == 3
    assert entry["info"] == {f"f{i}": i + 1 for i in range(8)}
    assert not list(cache_file.parent.glob("*.tmp"))


# -- lookup ------------------------------------------------------------------------------------


def test_names_and_lookup(dirs: DataDirs) -> None:
    path = write_safetensors(dirs.ckpt_dir / "sub" / "My Model.v1.safetensors", sd_state(pad=300_000))
    write_safetensors(dirs.ckpt_dir / "other.safetensors", sd_state(seed=1))
    reg = ModelRegistry(dirs)
    info = next(c for c in reg.checkpoints() if c.path == path)
    assert info.name == "sub/My Model.v1.safetensors"
    assert info.model_name == "sub_My Model.v1"
    assert info.family_label == "SD1.x"

    for query in (
        info.title,
        info.name,
        "sub/My Model.v1",
        info.model_name,
        info.shorthash,
        info.shorthash.upper(),
        info.sha256,
        info.legacy_hash,
        "sub/My Mo",  # a title prefix
        f"{info.name} [{info.legacy_hash}]",  # an old-style title with the 8-hex hash
        "My Model.v1",  # the bare stem
    ):
        assert reg.find_checkpoint(query) == info, query


def test_unknown_model_lists_closest_titles(dirs: DataDirs) -> None:
    write_safetensors(dirs.ckpt_dir / "anime-v3.safetensors", sd_state())
    write_safetensors(dirs.ckpt_dir / "photoreal.safetensors", sd_state(seed=2))
    reg = ModelRegistry(dirs)
    anime = reg.find_checkpoint("anime-v3")
    with pytest.raises(NotFoundError) as err:
        reg.find_checkpoint("anime-v2.safetensors")
    msg = str(err.value)
    assert "unknown model 'anime-v2.safetensors'" in msg
    assert anime.title in msg and "did you mean" in msg


def test_sorted_naturally_and_default(dirs: DataDirs) -> None:
    for name in ("m10.safetensors", "m2.safetensors", "A.safetensors"):
        write_safetensors(dirs.ckpt_dir / name, sd_state(seed=len(name)))
    reg = ModelRegistry(dirs)
    assert [c.name for c in reg.checkpoints()] == ["A.safetensors", "m2.safetensors", "m10.safetensors"]
    assert reg.default_checkpoint().name == "A.safetensors"


def test_no_checkpoints_says_where_to_put_them(dirs: DataDirs) -> None:
    with pytest.raises(MuralistError, match="Stable-diffusion"):
        ModelRegistry(dirs).default_checkpoint()


# -- caching -----------------------------------------------------------------------------------


def test_rescan_of_unchanged_files_reads_no_model_file(
    dirs: DataDirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write_safetensors(dirs.ckpt_dir / "a.safetensors", sd_state())
    write_ckpt(dirs.ckpt_dir / "b.ckpt", sd_state("sd2", seed=1))
    write_safetensors(dirs.ckpt_dir / "lora.safetensors", {"lora_unet_x.lora_down.weight": torch.ones(2, 2)})
    write_safetensors(dirs.vae_dir / "v.safetensors", {"decoder.conv_out.weight": torch.ones(3)})
    first = ModelRegistry(dirs)
    listing, skipped, vaes = first.checkpoints(), first.skipped(), first.vaes()
    assert len(listing) == 2 and len(skipped) == 1 and len(vaes) == 1

    def forbidden(*args, **kwargs):
        raise AssertionError(f"model file read on rescan: {args}")

    for module, name in (
        (files, "read_shapes"),
        (files, "load_state_dict"),
        (hashing, "sha256_file"),
        (hashing, "legacy_hash"),
        (torch, "load"),
    ):
        monkeypatch.setattr(module, name, forbidden)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith(MODEL_SUFFIXES):
            raise AssertionError(f"opened {file} on rescan")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)

    # A fresh registry too: the cache must come back from disk, not from memory.
    for reg in (first, ModelRegistry(dirs)):
        reg.refresh()
        assert reg.checkpoints() == listing
        assert reg.skipped() == skipped
        assert reg.vaes() == vaes

    # A touched file is hashed again; the others still come from the cache.
    monkeypatch.setattr(builtins, "open", real_open)
    hashed: list[Path] = []

    def counting_sha(path):
        hashed.append(Path(path))
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    monkeypatch.setattr(hashing, "sha256_file", counting_sha)
    monkeypatch.setattr(hashing, "legacy_hash", lambda p: "00000000")
    monkeypatch.setattr(files, "read_shapes", lambda p: {k: tuple(v.shape) for k, v in sd_state().items()})
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    first.refresh()
    first.checkpoints()
    assert hashed == [a]
    assert first.find_checkpoint("a").sha256 == listing[0].sha256

    # New content (and size) gives a new hash.
    write_safetensors(a, sd_state(pad=10))
    first.refresh()
    assert first.find_checkpoint("a").sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    assert first.find_checkpoint("a").sha256 != listing[0].sha256


# -- families ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
@pytest.mark.parametrize(
    ("family", "inpainting"),
    [("sd1", False), ("sd2", False), ("sdxl", False), ("sd1", True), ("sdxl", True)],
)
def test_family_detection(
    dirs: DataDirs, only_weights_only_loads: None, ext: str, family: str, inpainting: bool
) -> None:
    path = dirs.ckpt_dir / f"model{ext}"
    sd = sd_state(family, inpainting)
    if ext == ".ckpt":
        write_ckpt(path, sd)
    else:
        write_safetensors(path, sd)
    (info,) = ModelRegistry(dirs).checkpoints()
    assert info.kind == ModelKind(Family(family), inpainting)
    assert info.prediction_type == "epsilon" and not info.is_diffusers
    loaded = files.load_state_dict(path)
    assert set(loaded) == set(sd)  # "global_step" and the "state_dict" wrapper are gone


def test_old_pickle_format_ckpt(dirs: DataDirs, only_weights_only_loads: None) -> None:
    # Pre-zip torch.save files cannot be memory-mapped; reading them must still work.
    path = write_ckpt(dirs.ckpt_dir / "old.ckpt", sd_state("sd2"), zip_format=False)
    assert files.read_shapes(path)[UNET_IN] == (8, 4, 3, 3)
    (info,) = ModelRegistry(dirs).checkpoints()
    assert info.kind == ModelKind(Family.SD2)


# -- v-prediction ------------------------------------------------------------------------------


def test_yaml_sidecar_and_model_settings(dirs: DataDirs) -> None:
    write_safetensors(dirs.ckpt_dir / "v2-768.safetensors", sd_state("sd2"))
    (dirs.ckpt_dir / "v2-768.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    write_safetensors(dirs.ckpt_dir / "broken.safetensors", sd_state(seed=1))
    (dirs.ckpt_dir / "broken.yaml").write_text("model: [unclosed\n  params: {")
    write_safetensors(dirs.ckpt_dir / "plain.safetensors", sd_state(seed=2))
    reg = ModelRegistry(dirs)
    v2 = reg.find_checkpoint("v2-768")
    assert v2.prediction_type == "v_prediction"
    assert v2.config == dirs.ckpt_dir / "v2-768.yaml"
    assert reg.find_checkpoint("broken").prediction_type == "epsilon"
    assert reg.find_checkpoint("plain").prediction_type == "epsilon"
    assert [c.name for c in reg.checkpoints()] == [
        "broken.safetensors",
        "plain.safetensors",
        "v2-768.safetensors",
    ]

    settings = {
        "plain": {"prediction_type": "v_prediction"},  # by model_name
        "v2-768.safetensors": {"prediction_type": "epsilon"},  # by name; beats the yaml
    }
    (dirs.root / "model-settings.json").write_text(json.dumps(settings))
    reg.refresh()
    assert reg.find_checkpoint("plain").prediction_type == "v_prediction"
    assert reg.find_checkpoint("v2-768").prediction_type == "epsilon"


# -- VAEs --------------------------------------------------------------------------------------


def test_adjacent_vae_is_a_vae_not_a_checkpoint(dirs: DataDirs) -> None:
    write_safetensors(dirs.ckpt_dir / "foo.safetensors", sd_state())
    torch.save({"state_dict": {"decoder.conv_out.weight": torch.ones(3, 4)}}, dirs.ckpt_dir / "foo.vae.pt")
    write_safetensors(dirs.ckpt_dir / "bar.vae.safetensors", {"decoder.conv_out.weight": torch.ones(3)})
    write_safetensors(dirs.vae_dir / "kl-f8.safetensors", {"decoder.conv_out.weight": torch.zeros(3)})
    reg = ModelRegistry(dirs)
    assert [c.name for c in reg.checkpoints()] == ["foo.safetensors"]
    assert reg.skipped() == []
    assert [v.name for v in reg.vaes()] == ["bar.vae.safetensors", "foo.vae.pt", "kl-f8.safetensors"]

    vae = reg.find_vae("foo.vae.pt")
    assert vae.path == dirs.ckpt_dir / "foo.vae.pt"
    assert vae.sha256 == hashlib.sha256(vae.path.read_bytes()).hexdigest()
    kl = reg.find_vae("kl-f8")
    assert reg.find_vae(kl.shorthash) == kl and kl.shorthash == kl.sha256[:10]
    with pytest.raises(NotFoundError, match="unknown VAE 'kl-f9'.*kl-f8.safetensors"):
        reg.find_vae("kl-f9")


# -- broken and hostile files ------------------------------------------------------------------


def test_truncated_safetensors_is_reported_and_skipped(dirs: DataDirs) -> None:
    good = write_safetensors(dirs.ckpt_dir / "good.safetensors", sd_state())
    bad = dirs.ckpt_dir / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    for reader in (files.read_shapes, files.load_state_dict):
        with pytest.raises(ModelFileError, match="corrupt or truncated") as err:
            reader(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    reg = ModelRegistry(dirs)
    assert [c.name for c in reg.checkpoints()] == ["good.safetensors"]
    ((path, reason),) = reg.skipped()
    assert path == bad and "truncated" in reason


def test_truncated_ckpt_and_bad_files(tmp_path: Path, only_weights_only_loads: None) -> None:
    good = write_ckpt(tmp_path / "good.ckpt", sd_state())
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="bad.ckpt is corrupt or truncated"):
        files.read_shapes(bad)
    (tmp_path / "garbage.pt").write_bytes(b"hello, not a model")
    with pytest.raises(ModelFileError, match="corrupt"):
        files.load_state_dict(tmp_path / "garbage.pt")
    with pytest.raises(ModelFileError, match="does not exist"):
        files.read_shapes(tmp_path / "missing.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unsupported extension"):
        files.read_shapes(tmp_path / "model.gguf")


class Payload:
    """Pickles as a call to exec() that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(
    dirs: DataDirs, tmp_path: Path, only_weights_only_loads: None, zip_format: bool
) -> None:
    # The payload is live: plain pickle would run it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    path = dirs.ckpt_dir / "evil.ckpt"
    torch.save(
        {"state_dict": sd_state(), "payload": Payload(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    for reader in (files.read_shapes, files.load_state_dict):
        with pytest.raises(ModelFileError, match="wants to run code") as err:
            reader(path)
        assert str(path) in str(err.value) and "exec" in str(err.value) and "\n" not in str(err.value)
    reg = ModelRegistry(dirs)
    assert reg.checkpoints() == []
    ((skipped_path, reason),) = reg.skipped()
    assert skipped_path == path and "wants to run code" in reason
    assert not marker.exists()


def test_lightning_metadata_in_old_ckpt_is_tolerated(tmp_path: Path, only_weights_only_loads: None) -> None:
    # Genuine SD1.x training checkpoints pickle numpy scalars beside the weights; A1111 loads them.
    import numpy as np

    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": sd_state(), "callbacks": {"best": np.float64(0.5), "arr": np.zeros(2)}}, path)
    assert set(files.load_state_dict(path)) == set(sd_state())


def test_lora_in_checkpoint_folder_is_skipped(dirs: DataDirs) -> None:
    lora = write_safetensors(
        dirs.ckpt_dir / "style.safetensors",
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8)},
    )
    reg = ModelRegistry(dirs)
    assert reg.checkpoints() == []
    ((path, reason),) = reg.skipped()
    assert path == lora and "LoRA" in reason


# -- diffusers folders -------------------------------------------------------------------------


def write_diffusers(
    root: Path, pipeline: str, act: str | None, in_channels: int, prediction: str = "epsilon"
) -> Path:
    def dump(rel: str, data: dict) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))

    index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    dump("model_index.json", index)
    dump("unet/config.json", {"_class_name": "UNet2DConditionModel", "in_channels": in_channels})
    if act:
        dump("text_encoder/config.json", {"hidden_act": act})
    dump("scheduler/scheduler_config.json", {"prediction_type": prediction})
    unet = root / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"conv_in.weight": torch.randn(8, in_channels, 3, 3)}, str(unet))
    return unet


def test_diffusers_folders(dirs: DataDirs) -> None:
    unet = write_diffusers(dirs.ckpt_dir / "sd15-diffusers", "StableDiffusionPipeline", "quick_gelu", 4)
    write_diffusers(
        dirs.ckpt_dir / "hub" / "sd2-inpaint", "StableDiffusionInpaintPipeline", "gelu", 9, "v_prediction"
    )
    write_diffusers(dirs.ckpt_dir / "sdxl-1.0", "StableDiffusionXLPipeline", None, 4)
    write_diffusers(dirs.ckpt_dir / "sd3", "StableDiffusion3Pipeline", None, 16)
    reg = ModelRegistry(dirs)
    by_name = {c.name: c for c in reg.checkpoints()}
    assert set(by_name) == {"sd15-diffusers", "hub/sd2-inpaint", "sdxl-1.0"}  # no unet/*.safetensors entries

    sd15 = by_name["sd15-diffusers"]
    assert sd15.is_diffusers and sd15.kind == ModelKind(Family.SD1)
    assert sd15.sha256 == hashlib.sha256(unet.read_bytes()).hexdigest()
    assert sd15.title == f"sd15-diffusers [{sd15.sha256[:10]}]"
    inpaint = by_name["hub/sd2-inpaint"]
    assert inpaint.kind == ModelKind(Family.SD2, inpainting=True)
    assert inpaint.prediction_type == "v_prediction" and inpaint.model_name == "hub_sd2-inpaint"
    xl = by_name["sdxl-1.0"]
    assert xl.kind == ModelKind(Family.SDXL) and xl.model_name == "sdxl-1.0"  # no extension stripped
    assert reg.find_checkpoint("sdxl-1.0") == xl

    ((path, reason),) = reg.skipped()
    assert path == dirs.ckpt_dir / "sd3" and "StableDiffusion3Pipeline" in reason
