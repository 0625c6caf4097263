"""``muralist doctor``: check a machine and a configuration before serving.

Each check answers OK, WARN or FAIL with plain words saying what to change. The checks try the
real thing (bind the port, connect to the database, create a file in the data folder) rather than
reading permissions, which say nothing useful when running as root in a container.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .logs import redact
from .paths import DataDirs

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIN_FREE_BYTES = 10 * 2**30
MIN_FREE_FRACTION = 0.05
CONNECT_TIMEOUT = 3.0  # seconds: a database or Ray head that needs longer is as good as down for a probe


@dataclass
class Check:
    name: str
    status: str
    message: str


def check_python() -> Check:
    v = sys.version_info
    text = f"Python {v.major}.{v.minor}.{v.micro}"
    if v < (3, 11):
        return Check("python", FAIL, f"{text}: muralist needs Python 3.11 or newer")
    return Check("python", OK, text)


def check_torch() -> list[Check]:
    """torch's version, the GPUs it sees, and whether its build fits the NVIDIA device present."""
    try:
        import torch
    except Exception as e:
        return [Check("torch", FAIL, f"torch does not import ({type(e).__name__}: {e}): reinstall it (pip install torch)")]
    built_for = torch.version.cuda
    out = [Check("torch", OK, f"torch {torch.__version__} ({f'CUDA {built_for} build' if built_for else 'CPU build'})")]
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if count:
        names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
        out.append(Check("gpu", OK, f"{count} GPU(s) visible: {names}"))
    else:
        out.append(Check("gpu", WARN, "no GPU visible; generation runs on the CPU (slow)"))
    device = nvidia_device()
    if device and not built_for:
        out.append(Check("cuda", FAIL, f"an NVIDIA GPU is present ({device}) but torch is a CPU build: install torch "
                                       "built for CUDA (https://pytorch.org/get-started/locally/)"))
    elif device and not available:
        out.append(Check("cuda", FAIL, f"torch is built for CUDA {built_for} but cannot use the NVIDIA GPU present "
                                       f"({device}): the driver is too old for CUDA {built_for}, or this container has no "
                                       "GPU access (docker --gpus all); update the driver or install the torch build "
                                       "for your driver's CUDA version"))
    elif device:
        out.append(Check("cuda", OK, f"torch's CUDA {built_for} build uses the NVIDIA GPU"))
    else:
        out.append(Check("cuda", OK, "no NVIDIA device on this machine (nothing to match)"))
    return out


def nvidia_device() -> str | None:
    """How an NVIDIA GPU shows itself even when torch cannot use it, or None."""
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0"
    if shutil.which("nvidia-smi"):
        return "nvidia-smi on PATH"
    return None


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_folder(folder: Path, what: str, option: str) -> str | None:
    """None if files can be created in ``folder`` (or where it would be created), else what is wrong."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        return f"{what} {folder} cannot be created: {base} is a file, not a folder; point {option} elsewhere"
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".muralist-doctor-"):
            pass
    except OSError as e:
        return f"cannot write in {base} ({e.strerror}): give this user write access or point {option} elsewhere"
    return None


def check_data(dirs: DataDirs) -> Check:
    root = dirs.root
    if root.exists() and not root.is_dir():
        return Check("data folder", FAIL, f"{root} is a regular file, not a folder: point --data-dir "
                                          "(MURALIST_DATA_DIR) at a folder")
    problem = _writable_folder(root, "the data folder", "--data-dir (MURALIST_DATA_DIR)")
    if problem:
        return Check("data folder", FAIL, problem)
    return Check("data folder", OK, f"{root} is writable" if root.exists() else f"{root} will be created")


def check_database(url: str | None, dirs: DataDirs) -> Check:
    from .errors import MuralistError
    from .service.store import sqlite_path

    try:
        path = sqlite_path(url, dirs.root)
    except MuralistError as e:
        return Check("database", FAIL, str(e))
    if path is not None:
        problem = _writable_folder(path.parent, "the database folder", "--database (MURALIST_DATABASE)")
        if problem:
            return Check("database", FAIL, problem)
        if path.exists():
            try:
                with sqlite3.connect(path, timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.Error as e:
                return Check("database", FAIL, f"SQLite file {path} does not open ({e}): move it away or fix it")
            return Check("database", OK, f"SQLite {path}")
        return Check("database", OK, f"SQLite {path} (will be created)")
    assert url is not None
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg

            with psycopg.connect(url, connect_timeout=int(CONNECT_TIMEOUT)) as conn:
                conn.execute("SELECT 1")
        except Exception as e:
            detail = redact(" ".join(str(e).split()) or type(e).__name__)
            return Check("database", FAIL, f"cannot connect to PostgreSQL at {redact(url)}: {detail}; check the "
                                           "host, port, user and password in --database (MURALIST_DATABASE)")
        return Check("database", OK, f"PostgreSQL at {redact(url)} answers")
    return Check("database", FAIL, f"unsupported database URL {redact(url)!r}: use sqlite:///path or postgresql://...")


def _count(folder: Path, exts: tuple[str, ...]) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file())


def check_models(dirs: DataDirs) -> Check:
    from .models.registry import CHECKPOINT_EXTS, VAE_EXTS
    from .networks.lora import LORA_EXTS

    ckpt = dirs.ckpt_dir
    if ckpt.exists() and not ckpt.is_dir():
        return Check("models", FAIL, f"{ckpt} is a file, not a folder: point --ckpt-dir at the checkpoints folder")
    if not ckpt.is_dir():
        return Check("models", FAIL, f"no checkpoints folder at {ckpt}: put Stable Diffusion .safetensors files "
                                     "there (A1111 layout), or pass --data-dir / --ckpt-dir")
    try:
        checkpoints = _count(ckpt, CHECKPOINT_EXTS) + sum(1 for _ in ckpt.rglob("model_index.json"))
        vaes = _count(dirs.vae_dir, VAE_EXTS) if dirs.vae_dir.is_dir() else 0
        loras = _count(dirs.lora_dir, LORA_EXTS) if dirs.lora_dir.is_dir() else 0
    except OSError as e:
        return Check("models", FAIL, f"cannot read the model folders ({e.strerror}: {e.filename}): fix their permissions")
    counts = f"{checkpoints} checkpoint(s), {vaes} VAE(s), {loras} LoRA(s)"
    if not checkpoints:
        return Check("models", FAIL, f"{counts}: put Stable Diffusion .safetensors files in {ckpt} (or download one: "
                                     "muralist models download ...)")
    return Check("models", OK, f"{counts} in {dirs.root}")


def check_disk(dirs: DataDirs) -> Check:
    base = _existing_ancestor(dirs.root)
    usage = shutil.disk_usage(base if base.is_dir() else base.parent)
    free_gib = usage.free / 2**30
    text = f"{free_gib:.1f} GiB free of {usage.total / 2**30:.1f} GiB for {dirs.root}"
    if usage.free < MIN_FREE_BYTES or usage.free < MIN_FREE_FRACTION * usage.total:
        return Check("disk", WARN, f"{text}: nearly full; images, uploads and downloaded models need room "
                                   "(free space or move --data-dir)")
    return Check("disk", OK, text)


def bind_error(host: str, port: int) -> OSError | None:
    """Why the server could not listen on host:port (bound as uvicorn binds), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None


def check_port(host: str, port: int) -> Check:
    if e := bind_error(host, port):
        return Check("port", FAIL, f"cannot listen on {host}:{port} ({e.strerror}): stop what uses it "
                                   "(another muralist?) or choose another --port (MURALIST_PORT)")
    return Check("port", OK, f"{host}:{port} is free")


def check_cluster(address: str) -> Check:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return Check("ray head", FAIL, f"--cluster {address!r}: write HOST:PORT, e.g. 10.0.0.5:6380")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        return Check("ray head", FAIL, f"the Ray head at {address} does not answer ({e.strerror or e}): start it "
                                       "(muralist cluster start-head) or fix --cluster (MURALIST_CLUSTER)")
    return Check("ray head", OK, f"the Ray head at {address} accepts connections")


def run_checks(dirs: DataDirs, database: str | None, host: str, port: int, cluster: str | None) -> list[Check]:
    checks = [check_python(), *check_torch(), check_data(dirs), check_database(database, dirs)]
    checks += [check_models(dirs), check_disk(dirs), check_port(host, port)]
    if cluster:
        checks.append(check_cluster(cluster))
    return checks


def report(checks: list[Check], as_json: bool) -> tuple[str, int]:
    """The text to print and the exit code: 1 if any check failed."""
    import json

    failed = any(c.status == FAIL for c in checks)
    if as_json:
        text = json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2)
    else:
        text = "\n".join(f"{c.status:<4}  {c.name}: {c.message}" for c in checks)
    return text, 1 if failed else 0


__all__ = ["Check", "run_checks", "report", "OK", "WARN", "FAIL"]
