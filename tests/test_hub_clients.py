"""The providers' own clients against the fake provider servers of ``test_download``.

muralist moves the bytes with its own client (resume across restarts, sha256 check), so these tests
keep the fake servers honest: ``huggingface_hub`` and ``modelscope``, pointed at them with their
endpoint settings, must download the same files and get the same bytes (and send the same
credentials) as muralist's downloader. A test skips, saying why, when its library is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from muralist.models.download import DownloadSettings, download
from muralist.paths import DataDirs
from tests.test_download import (  # noqa: F401 - provider is a fixture
    HF_TOKEN,
    MS_TOKEN,
    MiB,
    Provider,
    blob,
    ckpts,
    provider,
    settings_for,
)

needs_hf = pytest.mark.skipif(find_spec("huggingface_hub") is None,
                              reason="huggingface_hub is not installed (it comes with diffusers)")
needs_ms = pytest.mark.skipif(find_spec("modelscope") is None,
                              reason="modelscope is not installed (pip install modelscope): its client is not checked")


@pytest.fixture
def hf_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub allowed online (the suite sets HF_HUB_OFFLINE=1; the only server these tests
    reach is the local one) over plain HTTP as from a mirror (HF_HUB_DISABLE_XET=1). It reads both at
    import, so its constants are set as well when another test imported it first."""
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@needs_hf
def test_huggingface_hub_reads_the_same_file_and_metadata(provider: Provider, tmp_path: Path,  # noqa: F811
                                                          hf_local: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    data = blob(seed=21)
    provider.hf[("org/model", "main", "unet/m.safetensors")] = data
    ours = download({"source": "hf", "repo": "org/model", "file": "unet/m.safetensors"}, DataDirs.from_options(tmp_path),
                    settings_for(provider, hf_token=HF_TOKEN))
    mine = (ckpts(tmp_path) / "m.safetensors").read_bytes()

    # The metadata muralist verifies against is what the Hub client reads from the same answer.
    meta = get_hf_file_metadata(hf_hub_url("org/model", "unet/m.safetensors", endpoint=provider.main), token=HF_TOKEN)
    assert meta.etag == ours["sha256"] and meta.size == len(data) and meta.commit_hash == "c" * 40

    # A transfer cut short: the real client's in-call resume must take the fake server's 206 answer.
    # It keeps whole read chunks only (10 MB by default): 1 MiB chunks let a 3 MiB file show it.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", MiB)
    provider.cut_after = 2 * MiB + 100
    cache = tmp_path / "hf-cache"
    path = hf_hub_download("org/model", "m.safetensors", subfolder="unet", endpoint=provider.main, cache_dir=cache,
                           token=HF_TOKEN)
    assert Path(path).read_bytes() == mine == data
    # The Hub client files the blob under its X-Linked-Etag: the sha256 muralist checked.
    assert (cache / "models--org--model" / "blobs" / ours["sha256"]).is_file()
    gets = [r for r in provider.content_requests() if r["method"] == "GET"]
    assert gets[-1]["range"] == f"bytes={2 * MiB}-" and gets[-1]["status"] == 206
    # Neither client hands the token to the CDN host.
    assert all(r["auth"] is None for r in provider.log if r["role"] == "storage")
    assert {r["auth"] for r in provider.log if r["role"] == "main"} == {f"Bearer {HF_TOKEN}"}


@needs_hf
def test_hf_endpoint_variable_points_both_clients_at_the_mirror(provider: Provider, tmp_path: Path,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = blob(MiB + 3, seed=22)
    provider.hf[("org/model", "main", "v.safetensors")] = data
    monkeypatch.setenv("HF_ENDPOINT", provider.main)
    ours = download({"source": "hf", "repo": "org/model", "file": "v.safetensors", "kind": "vae"},
                    DataDirs.from_options(tmp_path), DownloadSettings.from_env(backoff=0.01))
    # huggingface_hub reads HF_ENDPOINT at import: a fresh interpreter, as a user's shell would run it.
    env = {**os.environ, "HF_ENDPOINT": provider.main, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    script = ("import sys; from huggingface_hub import hf_hub_download; "
              "print(hf_hub_download('org/model', 'v.safetensors', local_dir=sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "theirs")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    theirs = Path(done.stdout.strip().splitlines()[-1]).read_bytes()
    assert theirs == (tmp_path / ours["path"]).read_bytes() == data


@needs_ms
def test_modelscope_client_gets_the_same_bytes_with_the_same_credentials(provider: Provider,  # noqa: F811
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from modelscope.hub.file_download import model_file_download
    from modelscope.hub.snapshot_download import snapshot_download

    data = blob(seed=23)
    provider.ms[("org/model", "master", "unet/m.safetensors")] = data
    # MODELSCOPE_ENDPOINT for both: modelscope's model_file_download looks the default revision up
    # with a client of its own that ignores ``endpoint=`` (it would ask www.modelscope.cn).
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", provider.main)
    ours = download({"source": "modelscope", "model_id": "org/model", "file": "unet/m.safetensors"},
                    DataDirs.from_options(tmp_path), DownloadSettings.from_env(modelscope_token=MS_TOKEN, backoff=0.01))
    our_auth = {(r["auth"], r["cookie"]) for r in provider.log if r["role"] == "main"}
    # The file comes from the storage host the file route redirects to: no token goes there.
    assert {(r["auth"], r["cookie"]) for r in provider.log if r["role"] == "storage"} == {(None, None)}
    provider.log.clear()

    cache = tmp_path / "ms-cache"
    one = model_file_download("org/model", "unet/m.safetensors", cache_dir=str(cache), local_dir=str(tmp_path / "one"),
                              token=MS_TOKEN)
    snap = snapshot_download("org/model", cache_dir=str(cache), local_dir=str(tmp_path / "snap"), endpoint=provider.main,
                             token=MS_TOKEN)
    mine = (tmp_path / ours["path"]).read_bytes()
    assert Path(one).read_bytes() == (Path(snap) / "unet" / "m.safetensors").read_bytes() == mine == data
    # The revisions, listing and file routes all answered the real client.
    answered = {(r["path"].split("?")[0].rsplit("/", 1)[-1], r["status"]) for r in provider.log}
    assert {("revisions", 200), ("files", 200), ("repo", 302)} <= answered
    # It sends its token as muralist does: bearer header and m_session_id cookie.
    theirs = {(r["auth"], r["cookie"]) for r in provider.log if "/models/org/model/repo" in r["path"]}
    assert our_auth == theirs == {(f"Bearer {MS_TOKEN}", f"m_session_id={MS_TOKEN}")}

    # Both check the listing's Sha256: a corrupted transfer fails in their client as in ours.
    provider.corrupt = True
    with pytest.raises(Exception, match="(?i)hash mismatch"):  # noqa: B017, PT011 - its own error class
        snapshot_download("org/model", cache_dir=str(tmp_path / "ms-cache-2"), local_dir=str(tmp_path / "bad"),
                          endpoint=provider.main, token=MS_TOKEN)
    assert not (tmp_path / "bad" / "unet" / "m.safetensors").exists()
