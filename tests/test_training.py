"""LoRA training: kohya datasets and options in, kohya-format files out, as queued jobs."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from muralist.errors import InvalidRequestError
from muralist.training.dataset import assign_buckets, bucket_resolutions, extract_zip, load_dataset
from muralist.training.options import parse_options, read_toml
from tests.server_util import link_models, running_server

FAST = {"resolution": "64,64", "train_batch_size": 4, "network_dim": 8, "network_alpha": 4, "learning_rate": 1e-3,
        "unet_lr": 1e-3, "text_encoder_lr": 1e-4, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 8,
        "max_train_epochs": 2, "save_every_n_epochs": 1, "output_name": "shapes", "shuffle_caption": False}


def shape(i: int, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    (draw.ellipse if i % 2 else draw.rectangle)((8 + i, 8, size - 10, size - 8 - i), fill=(200, 30, 30))
    return img


def make_dataset(folder: Path, n: int = 4, sub: str = "10_sks shape") -> Path:
    d = folder / sub
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape(i).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"sks shape, {'circle' if i % 2 else 'square'}\nsecond line is ignored\n")
    return folder


def zipped(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def png(i: int) -> bytes:
    buf = io.BytesIO()
    shape(i).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------- datasets and options


def test_kohya_folders_captions_and_buckets(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    (root / "notes").mkdir()
    (root / "10_sks shape" / "9.png").write_bytes(png(1))  # no caption: the class tokens
    ds = load_dataset(root)
    assert ds.repeats == {"10_sks shape": 10} and len(ds.items) == 5 and ds.num_train_images == 50
    assert ds.items[0].caption == "sks shape, square" and ds.items[-1].caption == "sks shape"
    assert any("notes" in w for w in ds.warnings)
    assert ds.tag_frequency()["10_sks shape"]["sks shape"] == 5
    # kohya's bucket list for 512x512, 256..1024 step 64
    buckets = bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets and (576, 448) in buckets
    assign_buckets(ds, (64, 64), True, 64, 128, 8, no_upscale=True)
    assert {i.bucket for i in ds.items} == {(64, 64)}


def test_bad_datasets_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="no training images"):
        load_dataset(make_dataset(tmp_path / "a", 0))
    bad = make_dataset(tmp_path / "b", 1)
    (bad / "10_sks shape" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidRequestError, match="broken.png: not a readable image"):
        load_dataset(bad)
    wrong = tmp_path / "c" / "sks shape"
    wrong.mkdir(parents=True)
    shape(0).save(wrong / "0.png")
    with pytest.raises(InvalidRequestError, match="<repeats>_<class tokens>"):
        load_dataset(tmp_path / "c")


def test_zip_uploads_refuse_path_tricks_and_wrap_loose_images(tmp_path: Path) -> None:
    for evil in ("../escape.png", "/abs.png", "a/../../escape.png"):
        with pytest.raises(InvalidRequestError, match="inside"):
            extract_zip(zipped({evil: png(0)}), tmp_path / "x", 10**7)
    assert not (tmp_path / "escape.png").exists()
    link = io.BytesIO()
    with zipfile.ZipFile(link, "w") as z:
        info = zipfile.ZipInfo("10_a/link.png")
        info.external_attr = 0o120777 << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidRequestError, match="links"):
        extract_zip(link.getvalue(), tmp_path / "y", 10**7)
    with pytest.raises(InvalidRequestError, match="over the dataset limit"):
        extract_zip(zipped({"10_a/big.png": b"\0" * 5000}), tmp_path / "z", 1000)
    notes = extract_zip(zipped({"a.png": png(0), "a.txt": b"red square", "b.png": png(1)}), tmp_path / "loose", 10**7)
    assert (tmp_path / "loose" / "7_zkz" / "a.txt").read_text() == "red square" and "7_zkz" in notes[0]


def test_lora_scripts_toml_and_unknown_keys(tmp_path: Path) -> None:
    toml = tmp_path / "train.toml"
    toml.write_text('''
[model_arguments]
pretrained_model_name_or_path = "tiny-sd15"
[dataset_arguments]
train_data_dir = "shapes"
resolution = "512,768"
[training_arguments]
max_train_epochs = 3
xformers = true
output_dir = "./output"
optimizer_type = "AdamW"
''')
    opts, notes = parse_options(read_toml(toml))
    assert opts.size == (512, 768) and opts.max_train_epochs == 3 and opts.network_dim == 32 and opts.caption_extension == ".txt"
    assert any(n.startswith("xformers is ignored") for n in notes) and any("output_dir" in n for n in notes)
    with pytest.raises(InvalidRequestError, match="unknown training option.*network_dimm"):
        parse_options({**read_toml(toml), "network_dimm": 4})
    with pytest.raises(InvalidRequestError, match="max_train_epochs or max_train_steps"):
        parse_options({"pretrained_model_name_or_path": "x", "train_data_dir": "y", "max_train_epochs": None})
    from muralist.training.lora import optimizer_available

    assert "bitsandbytes" in (optimizer_available("AdamW8bit") or "") or torch.cuda.is_available()


# ----------------------------------------------------------------- training


def _eval_loss(model, data: Path, seed: int = 0) -> float:
    """The loss on a fixed set of (timestep, noise) pairs per image, the same before and after."""
    from diffusers import DDPMScheduler

    from muralist.training.dataset import load_image
    from muralist.training.lora import conditioning

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ds = load_dataset(data)
    assign_buckets(ds, (64, 64), False, 64, 64, 8, False)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for item in ds.items:
            img = torch.from_numpy(np.asarray(load_image(item), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            x0 = model.vae.encode(img).latent_dist.mean * model.vae_scale
            ctx, _ = conditioning(model, [item.caption], 2, 75)
            t = torch.randint(100, 900, (8,), generator=g)
            noise = torch.randn((8, *x0.shape[1:]), generator=g)
            pred = model.unet(sched.add_noise(x0.repeat(8, 1, 1, 1), noise, t), t, encoder_hidden_states=ctx.repeat(8, 1, 1)).sample
            total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / len(ds.items)


def _train(engine, data: Path, fam: str = "tiny-sd15", **kw):
    from muralist.models.loader import load_checkpoint
    from muralist.training.lora import train_lora

    info = engine.registry.find_checkpoint(fam)
    model = load_checkpoint(info.path, info.kind, info.prediction_type, "cpu")
    opts, _ = parse_options({"pretrained_model_name_or_path": fam, "train_data_dir": data.name, **FAST, **kw})
    saved: list = []
    steps: list[int] = []
    result = train_lora(model, info, opts, data, save=saved.append, progress=lambda p: steps.append(p.step))
    return model, info, opts, saved, steps, result


def test_training_learns_and_writes_a_kohya_file(engine, tmp_path: Path) -> None:
    from safetensors import safe_open

    from muralist.models.loader import load_checkpoint

    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "shapes")
    info = engine.registry.find_checkpoint("tiny-sd15")
    before = _eval_loss(load_checkpoint(info.path, info.kind, info.prediction_type, "cpu"), data)
    model, info, opts, saved, steps, result = _train(engine, data, max_train_epochs=4, save_every_n_epochs=2, unet_lr=4e-3)
    after = _eval_loss(model, data)
    assert after < before * 0.95, (before, after)
    assert steps == list(range(1, 41)) and result.steps == 40  # 4 images x 10 repeats / batch 4, 4 epochs
    kinds = [(s.kind, s.name) for s in saved]
    assert ("epoch", "shapes-000002.safetensors") in kinds and ("final", "shapes.safetensors") in kinds
    final = next(s for s in saved if s.kind == "final")
    path = tmp_path / "shapes.safetensors"
    path.write_bytes(final.data)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
        down = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight")
        te = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight")
    assert len(keys) == 3 * (192 + 12)  # the tiny SD1: 192 UNet modules (as kohya counts), 2 TE layers x 6
    assert alpha.item() == 4 and alpha.dtype == torch.float16 and down.shape[0] == 8 and te.shape[1] == 8
    assert meta["ss_network_dim"] == "8" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "shapes"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks shape": {"n_repeats": 10, "img_count": 4}}
    import hashlib

    raw = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    sidecar = json.loads(next(s for s in saved if s.kind == "sidecar").data)
    assert sidecar["activation text"] == "sks shape" and sidecar["sd version"] == "SD1"


def test_the_file_applies_like_the_trained_model_in_muralist_and_diffusers(engine, tmp_path: Path) -> None:
    """Two independent loaders of the kohya file reproduce the trained adapters' UNet output."""
    from diffusers import StableDiffusionPipeline

    from muralist.models.loader import load_checkpoint
    from muralist.networks.lora import LoraRegistry, applied_loras
    from muralist.paths import DataDirs

    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "shapes")
    model, info, _, saved, _, _ = _train(engine, data, max_train_epochs=2, network_train_unet_only=True)
    path = tmp_path / "lora" / "shapes.safetensors"
    path.parent.mkdir()
    path.write_bytes(next(s for s in saved if s.kind == "final").data)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        trained = model.unet(x, t, encoder_hidden_states=ctx).sample
        fresh = load_checkpoint(info.path, info.kind, info.prediction_type, "cpu")
        plain = fresh.unet(x, t, encoder_hidden_states=ctx).sample
        assert (trained - plain).abs().max() > 1e-3  # the LoRA does something
        info_lora = LoraRegistry(DataDirs.from_options(tmp_path, lora_dir=path.parent)).find("shapes")
        with applied_loras(fresh, [(info_lora, 1.0, 1.0)]):
            ours = fresh.unet(x, t, encoder_hidden_states=ctx).sample
        other = load_checkpoint(info.path, info.kind, info.prediction_type, "cpu")
        pipe = StableDiffusionPipeline(vae=other.vae, text_encoder=other.text_encoders["text_encoder"],
                                       tokenizer=other.tokenizers["text_encoder"], unet=other.unet, scheduler=None,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert (ours - trained).abs().max() < 2e-3 and (theirs - trained).abs().max() < 2e-3


def test_sdxl_lora_has_kohya_sdxl_names(engine, tmp_path: Path) -> None:
    from safetensors import safe_open

    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "shapes", n=2)
    _, _, _, saved, _, _ = _train(engine, data, fam="tiny-sdxl", max_train_epochs=1)
    path = tmp_path / "xl.safetensors"
    path.write_bytes(next(s for s in saved if s.kind == "final").data)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0") for k in keys)
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_stopped_training_resumes_from_its_last_epoch(engine, tmp_path: Path) -> None:
    from muralist.models.loader import load_checkpoint
    from muralist.training.lora import train_lora

    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "shapes")
    info = engine.registry.find_checkpoint("tiny-sd15")
    saved, seen = [], []

    def stop_in_epoch_two() -> bool:  # 10 steps an epoch: stop after epoch 1's state was saved
        return len(seen) >= 13

    model = load_checkpoint(info.path, info.kind, info.prediction_type, "cpu")
    opts, _ = parse_options({"pretrained_model_name_or_path": "tiny-sd15", "train_data_dir": "shapes", **FAST,
                             "max_train_epochs": 3})
    r1 = train_lora(model, info, opts, data, save=saved.append, progress=lambda p: seen.append(p.step), stopped=stop_in_epoch_two)
    assert r1.canceled and [s.name for s in saved if s.kind == "epoch"] == ["shapes-000001.safetensors"]
    state = [s for s in saved if s.kind == "state"][-1]
    assert state.epoch == 1
    again, seen2 = [], []
    model2 = load_checkpoint(info.path, info.kind, info.prediction_type, "cpu")
    r2 = train_lora(model2, info, opts, data, save=again.append, progress=lambda p: seen2.append(p.step), resume=state.data)
    assert seen2[0] == 11 and seen2[-1] == 30 and r2.steps == 30 and len(r2.losses) == 30  # continues at epoch 2
    assert any(s.kind == "final" for s in again)


# ----------------------------------------------------------------- as jobs


@pytest.fixture()
def server(a1111_models: Path, tmp_path: Path):
    import httpx

    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root) as (url, service):
        keys = {n: service.store.add_user(n) for n in ("alice", "bob")}
        yield url, service, {n: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=120)
                             for n, k in keys.items()}


def _wait(client, job_id: str, timeout: float = 300) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_train_as_a_job_and_use_the_lora_at_once(server) -> None:
    url, service, c = server
    files = {f"10_sks shape/{i}.png": png(i) for i in range(4)} | {f"10_sks shape/{i}.txt": b"sks shape" for i in range(4)}
    r = c["alice"].put("/api/v1/datasets/shapes", content=zipped(files), headers={"Content-Type": "application/zip"})
    assert r.status_code == 201, r.text
    assert r.json()["folders"] == {"10_sks shape": {"n_repeats": 10, "img_count": 4}}
    # bob can neither see nor train on alice's dataset
    assert c["bob"].get("/api/v1/datasets/shapes").status_code == 404
    assert c["bob"].get("/api/v1/datasets").json()["datasets"] == []
    params = {"pretrained_model_name_or_path": "tiny-sd15", "train_data_dir": "shapes", **FAST, "output_name": "alice_shapes"}
    r = c["bob"].post("/api/v1/jobs", json={"type": "train_lora", "params": params})
    assert r.status_code == 422 and "no dataset 'shapes'" in r.json()["detail"]
    for bad, word in (({"network_dimm": 4}, "network_dimm"), ({"optimizer_type": "AdamW8bit"}, "AdamW"),
                      ({"train_data_dir": "../bob"}, "not paths"), ({"max_train_epochs": 5000}, "max_train_steps")):
        r = c["alice"].post("/api/v1/jobs", json={"type": "train_lora", "params": {**params, **bad}})
        assert r.status_code == 422 and word in r.json()["detail"], (bad, r.text)
    samples = {"sample_prompts": "sks shape\n# a comment line\nsks shape, circle", "sample_every_n_epochs": 1}
    r = c["alice"].post("/api/v1/jobs", json={"type": "train_lora", "params": {**params, **samples}})
    assert r.status_code == 202, r.text
    job = _wait(c["alice"], r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["lora"] == "alice_shapes" and job["result"]["steps"] == 20 and len(job["result"]["loss"]) == 20
    assert len(job["result"]["images"]) == 4  # 2 prompts after each of the 2 epochs
    sample = c["alice"].get(f"/api/v1/images/{job['result']['images'][-1]}")
    assert sample.status_code == 200 and b"Training epoch: 2" in sample.content
    lora_dir = service.dirs.lora_dir / "alice"
    assert sorted(p.name for p in lora_dir.iterdir()) == ["alice_shapes-000001.safetensors", "alice_shapes.json",
                                                          "alice_shapes.safetensors"]
    assert not (service.dirs.root / "training" / job["id"]).exists()  # the resume state is gone with the job
    loras = {lo["name"]: lo for lo in c["alice"].get("/sdapi/v1/loras").json()}
    meta = loras["alice_shapes"]["metadata"]
    assert meta["ss_dataset_dirs"] == {"10_sks shape": {"n_repeats": 10, "img_count": 4}}  # objects, as A1111 returns them
    body = {"prompt": "sks shape", "steps": 4, "width": 64, "height": 64, "seed": 3}
    plain = c["alice"].post("/sdapi/v1/txt2img", json=body).json()
    used = c["alice"].post("/sdapi/v1/txt2img", json={**body, "prompt": "sks shape <lora:alice_shapes:1>"}).json()
    assert plain["images"][0] != used["images"][0] and "alice_shapes" in json.loads(used["info"])["infotexts"][0]


def test_canceled_training_keeps_its_saved_epochs(server) -> None:
    url, service, c = server
    files = {f"10_sks shape/{i}.png": png(i) for i in range(4)}
    assert c["alice"].put("/api/v1/datasets/shapes", content=zipped(files)).status_code == 201
    params = {"pretrained_model_name_or_path": "tiny-sd15", "train_data_dir": "shapes", **FAST, "max_train_epochs": 400,
              "output_name": "long"}
    job_id = c["alice"].post("/api/v1/jobs", json={"type": "train_lora", "params": params}).json()["id"]
    first = service.dirs.lora_dir / "alice" / "long-000001.safetensors"
    end = time.time() + 120
    while not first.exists() and time.time() < end:
        time.sleep(0.1)
    assert first.exists()
    # a second training while one runs is refused, naming the limit
    r = c["alice"].post("/api/v1/jobs", json={"type": "train_lora", "params": {**params, "output_name": "other"}})
    assert r.status_code == 429 and "max_trainings" in r.json()["detail"]
    c["alice"].post(f"/api/v1/jobs/{job_id}/cancel")
    job = _wait(c["alice"], job_id)
    assert job["status"] == "canceled" and first.exists()
    assert not (service.dirs.lora_dir / "alice" / "long.safetensors").exists()
    assert not (service.dirs.root / "training" / job_id).exists()


def test_cli_trains_from_a_lora_scripts_toml(a1111_models: Path, tmp_path: Path, capsys) -> None:
    from muralist.cli import main

    torch.set_num_threads(1)
    root = link_models(a1111_models, tmp_path / "data", ("tiny-sd15.safetensors",))
    make_dataset(tmp_path / "train" / "shapes", n=2)
    toml = tmp_path / "train" / "autosave.toml"
    toml.write_text('''model_train_type = "sd-lora"
pretrained_model_name_or_path = "tiny-sd15"
train_data_dir = "shapes"
resolution = "64,64"
network_dim = 4
network_alpha = 2
max_train_epochs = 1
train_batch_size = 4
optimizer_type = "AdamW"
output_name = "from_toml"
min_bucket_reso = 64
bucket_reso_steps = 8
xformers = true
''')
    assert main(["train", "lora", "--config", str(toml), "--data-dir", str(root)]) == 0
    out = capsys.readouterr()
    assert (root / "models" / "Lora" / "from_toml.safetensors").is_file() and "from_toml.safetensors" in out.out
    assert "xformers is ignored" in out.err and "step 5/5" in out.err


def test_a_killed_server_resumes_the_training_after_restart(a1111_models: Path, tmp_path: Path) -> None:
    """SIGKILL mid-training; the restarted server re-runs the job from its last saved epoch."""
    import httpx

    from tests.server_util import free_port, serve_subprocess, wait_http, wait_job

    root = link_models(a1111_models, tmp_path / "data", ("tiny-sd15.safetensors",))
    port = free_port()
    proc = serve_subprocess(root, port, None, "--lease-timeout", "2")
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_http(f"http://127.0.0.1:{port}")
        files = {f"10_sks shape/{i}.png": png(i) for i in range(4)}
        assert c.put("/api/v1/datasets/shapes", content=zipped(files)).status_code == 201
        params = {"pretrained_model_name_or_path": "tiny-sd15", "train_data_dir": "shapes", **FAST, "max_train_epochs": 8}
        job_id = c.post("/api/v1/jobs", json={"type": "train_lora", "params": params}).json()["id"]
        state = root / "training" / job_id / "state.pt"
        end = time.time() + 120
        while time.time() < end and not (state.exists() and (root / "models" / "Lora" / "local" / "shapes-000003.safetensors").exists()):
            time.sleep(0.05)
        assert state.exists()
    finally:
        proc.kill()
        proc.wait(30)
    proc = serve_subprocess(root, port, None, "--lease-timeout", "2")
    try:
        wait_http(f"http://127.0.0.1:{port}")
        job = wait_job(c, job_id, timeout=300)
    finally:
        proc.terminate()
        proc.wait(30)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and job["result"]["steps"] == 80 and len(job["result"]["loss"]) == 80
    assert job["result"]["resumed_from_step"] >= 20  # epoch 3 was saved, so epoch 2's state was: not from zero
    assert (root / "models" / "Lora" / "local" / "shapes.safetensors").is_file() and not state.exists()


def test_embedding_training_writes_an_a1111_embedding_used_in_prompts(server) -> None:
    """A1111's textual inversion as a job: the .pt lands in embeddings/<user>/, loads, and changes images."""
    url, service, c = server
    files = {f"5_red ball/{i}.png": png(i) for i in range(4)} | {f"5_red ball/{i}.txt": b"round, red" for i in range(4)}
    assert c["alice"].put("/api/v1/datasets/balls", content=zipped(files)).status_code == 201
    params = {"embedding_name": "redball", "pretrained_model_name_or_path": "tiny-sd15", "data_root": "balls",
              "num_vectors_per_token": 2, "init_text": "red ball", "steps": 20, "batch_size": 2, "training_width": 64,
              "training_height": 64, "save_embedding_every": 10, "learn_rate": "0.05:10, 0.01",
              "template_filename": "subject_filewords.txt"}
    r = c["alice"].post("/api/v1/jobs", json={"type": "train_embedding", "params": params})
    assert r.status_code == 202, r.text
    job = _wait(c["alice"], r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["embedding"] == "redball" and job["result"]["steps"] == 20
    path = service.dirs.embeddings_dir / "alice" / "redball.pt"
    data = torch.load(path, weights_only=True)
    assert data["step"] == 20 and data["string_to_param"]["*"].shape == (2, 32) and data["sd_checkpoint_name"] == "tiny-sd15"
    assert (service.dirs.outputs_dir / "alice" / "textual_inversion" / "redball" / "redball-10.pt").is_file()
    emb = c["alice"].get("/sdapi/v1/embeddings").json()["loaded"]
    assert emb["redball"]["vectors"] == 2 and emb["redball"]["step"] == 20
    body = {"prompt": "a photo of a ball", "steps": 4, "width": 64, "height": 64, "seed": 3}
    plain = c["alice"].post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    used = c["alice"].post("/sdapi/v1/txt2img", json={**body, "prompt": "a photo of a redball"}).json()
    assert used["images"][0] != plain and "redball" in json.loads(used["info"])["infotexts"][0]
    bad = c["alice"].post("/api/v1/jobs", json={"type": "train_embedding", "params": {**params, "learn_rate": "fast"}})
    assert bad.status_code == 422 and "learn_rate" in bad.json()["detail"]
    xl = c["alice"].post("/api/v1/jobs", json={"type": "train_embedding", "params": {**params, "template_filename": "x.txt"}})
    assert xl.status_code == 422 and "subject.txt" in xl.json()["detail"]


def test_locon_adds_conv_layers_at_conv_dim(engine, tmp_path: Path) -> None:
    from safetensors import safe_open

    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "shapes", n=2)
    _, _, _, saved, _, _ = _train(engine, data, max_train_epochs=1, network_args=["conv_dim=4", "conv_alpha=2"])
    path = tmp_path / "locon.safetensors"
    path.write_bytes(next(s for s in saved if s.kind == "final").data)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        alpha = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
        attn = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight")
    assert down.shape[0] == 4 and down.shape[2:] == (3, 3) and alpha.item() == 2 and attn.shape[0] == 8
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert not any("conv_in" in k or "conv_out" in k for k in keys)


@pytest.mark.parametrize("option", [{"noise_offset": 0.1}, {"min_snr_gamma": 5.0}])
def test_noise_offset_and_min_snr_change_the_training(engine, tmp_path: Path, option: dict) -> None:
    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "shapes", n=2)
    base = _train(engine, data, max_train_epochs=1)[5].losses
    other = _train(engine, data, max_train_epochs=1, **option)[5].losses
    assert len(base) == len(other) == 5 and base != other


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    from muralist.training.lora import plan

    ds = load_dataset(make_dataset(tmp_path / "shapes"))
    assign_buckets(ds, (64, 64), False, 64, 64, 8, False)
    opts = lambda **kw: parse_options({"pretrained_model_name_or_path": "m", "train_data_dir": "d", **FAST, **kw})[0]  # noqa: E731
    assert plan(ds, opts(max_train_epochs=3)).steps == 30  # 40 images a epoch, batch 4
    assert plan(ds, opts(max_train_epochs=3, gradient_accumulation_steps=2)).steps == 15
    assert plan(ds, opts(max_train_epochs=None, max_train_steps=25)).epochs == 3
