"""The per-worker model manager: one budget for every kind of model, room made before a load."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from muralist.models.manager import ModelManager, file_bytes, measure_bytes

KB = 1024


def module(nbytes: int) -> nn.Module:
    """A module whose parameters take exactly ``nbytes`` (float32)."""
    return nn.Linear(nbytes // 4, 1, bias=False)


def loader(nbytes: int, calls: list[int] | None = None):
    def load() -> nn.Module:
        if calls is not None:
            calls.append(nbytes)
        return module(nbytes)

    return load


def test_measure_finds_modules_inside_objects_and_counts_buffers() -> None:
    m = module(4 * KB)
    m.register_buffer("extra", torch.zeros(256))  # 1 KiB
    assert measure_bytes(m) == 5 * KB
    assert measure_bytes((object(), {"a": m, "b": [m]})) == 5 * KB  # shared modules once
    assert measure_bytes("not a model") is None


def test_reserve_before_load_evicts_first(tmp_path: Path) -> None:
    mgr = ModelManager("cpu", max_bytes=10 * KB)
    mgr.get("checkpoint", "a", loader(6 * KB), estimate=6 * KB)
    seen_during_load = []

    def load_b() -> nn.Module:
        seen_during_load.append((mgr.loaded(), mgr.used_bytes()))
        return module(6 * KB)

    mgr.get("checkpoint", "b", load_b, estimate=6 * KB)
    # a was gone before b's loader ran, and b's reservation already counted.
    assert seen_during_load == [([], 6 * KB)]
    assert mgr.loaded() == [("checkpoint", "b")]


def test_a_pinned_entry_is_never_evicted(caplog: pytest.LogCaptureFixture) -> None:
    mgr = ModelManager("cpu", max_bytes=10 * KB)
    with mgr.use("checkpoint", "a", loader(6 * KB), 6 * KB) as a:
        with caplog.at_level(logging.WARNING, logger="muralist.models.manager"):
            mgr.get("upscaler", "u", loader(6 * KB), 6 * KB)
        assert "budget" in caplog.text
        assert mgr.loaded() == [("checkpoint", "a"), ("upscaler", "u")]  # over budget, both stay
        assert mgr.summary()[0] == {"kind": "checkpoint", "label": "a", "bytes": 6 * KB, "pinned": True}
        assert mgr.evict_all() == 1
        assert mgr.get("checkpoint", "a", loader(6 * KB), 6 * KB) is a
    assert not mgr.summary()[0]["pinned"]


def test_unpinning_returns_within_budget() -> None:
    mgr = ModelManager("cpu", max_bytes=10 * KB)
    with mgr.use("checkpoint", "a", loader(6 * KB), 6 * KB):
        mgr.get("vae", "v", loader(6 * KB), 6 * KB)
    # v came after a, but a was pinned; once a is released the least recently used goes.
    assert mgr.loaded() == [("vae", "v")]


def test_per_kind_count_limit() -> None:
    mgr = ModelManager("cpu", max_count={"upscaler": 2})
    mgr.get("checkpoint", "c", loader(KB), KB)
    for name in ("u1", "u2", "u3"):
        mgr.get("upscaler", name, loader(KB), KB)
    assert mgr.loaded() == [("checkpoint", "c"), ("upscaler", "u2"), ("upscaler", "u3")]
    assert mgr.loaded("upscaler") == [("upscaler", "u2"), ("upscaler", "u3")]


def test_lru_order_across_kinds_shares_one_budget() -> None:
    mgr = ModelManager("cpu", max_bytes=10 * KB)
    mgr.get("checkpoint", "c", loader(4 * KB), 4 * KB)
    mgr.get("upscaler", "u", loader(4 * KB), 4 * KB)
    mgr.get("checkpoint", "c", loader(4 * KB), 4 * KB)  # touch: u is now the oldest
    mgr.get("face", "f", loader(4 * KB), 4 * KB)
    assert mgr.loaded() == [("checkpoint", "c"), ("face", "f")]
    assert mgr.used_bytes() == 8 * KB


def test_same_key_from_two_threads_loads_once() -> None:
    mgr = ModelManager("cpu")
    calls: list[int] = []
    results: list[nn.Module] = []

    def slow() -> nn.Module:
        calls.append(1)
        time.sleep(0.2)
        return module(KB)

    threads = [threading.Thread(target=lambda: results.append(mgr.get("blip", "k", slow, KB))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and all(r is results[0] for r in results)


def test_a_failing_loader_leaves_nothing_behind() -> None:
    mgr = ModelManager("cpu", max_bytes=100 * KB)
    mgr.get("checkpoint", "a", loader(4 * KB), 4 * KB)

    def broken() -> nn.Module:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        mgr.get("checkpoint", "b", broken, 50 * KB)
    assert mgr.used_bytes() == 4 * KB and mgr.loaded() == [("checkpoint", "a")]
    assert mgr.get("checkpoint", "b", loader(KB), KB) is not None  # a retry loads


def test_measured_size_replaces_the_estimate_and_evicts_again() -> None:
    mgr = ModelManager("cpu", max_bytes=10 * KB)
    mgr.get("checkpoint", "a", loader(4 * KB), 1)
    assert mgr.used_bytes() == 4 * KB
    mgr.get("upscaler", "u", loader(8 * KB), 1)  # the estimate fitted, the real size does not
    assert mgr.loaded() == [("upscaler", "u")] and mgr.used_bytes() == 8 * KB
    mgr.get("face", "f", lambda: "no modules", 3 * KB)  # nothing to measure: the estimate stands
    assert mgr.summary()[-1]["bytes"] == 3 * KB


def test_file_bytes(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"x" * 5)
    assert file_bytes(tmp_path / "d" / "a.bin") == 10
    assert file_bytes(tmp_path / "d") == 15
    assert file_bytes(tmp_path / "missing") == 0


def test_engine_with_a_budget_for_one_checkpoint(a1111_models: Path, engine, tmp_path: Path) -> None:
    from muralist.engine.engine import Engine, ModelCache
    from muralist.paths import DataDirs
    from muralist.request import GenerationRequest

    a, b = (engine.registry.find_checkpoint(n) for n in ("tiny-sd15.safetensors", "tiny-sd21"))
    biggest = max(engine.cache.model(a).parameters_bytes(), engine.cache.model(b).parameters_bytes())
    cache = ModelCache(max_models=5, device="cpu", max_bytes=int(biggest * 1.5))
    small = Engine(DataDirs.from_options(a1111_models), cache=cache)
    assert small.upscalers.manager is small.faces.manager is small.interrogator.manager is cache.manager

    def image(eng: Engine, model: str) -> np.ndarray:
        req = GenerationRequest(prompt="a cat", model=model, steps=2, width=64, height=64, seed=7)
        return np.asarray(eng.generate(req, save_to=tmp_path / str(id(eng))).result.images[0])

    got_a, got_b = image(small, a.name), image(small, b.name)
    assert cache.loaded() == [(str(b.path), b.sha256)]
    assert cache.manager.used_bytes() <= cache.max_bytes
    assert np.array_equal(got_a, image(engine, a.name))
    assert np.array_equal(got_b, image(engine, b.name))
