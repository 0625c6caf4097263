"""A schemathesis run over the whole /openapi.json against a real server: no 5xx, every response
(errors included) in its declared schema, status code and content type."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_util import link_models, running_server

pytest.importorskip("schemathesis")

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,allow_header_conformance")


def test_schemathesis_finds_no_server_error_and_no_schema_violation(a1111_models: Path, tmp_path: Path) -> None:
    root = link_models(a1111_models, tmp_path / "data")
    with running_server(root) as (url, service):
        key = service.store.add_user("fuzz")
        # Small limits keep every generation it manages to make quick on a CPU.
        service.store.set_user_limits("fuzz", {"max_pixels": 64 * 64 * 4, "max_steps": 3, "max_images": 2,
                                              "max_queued": 1000, "max_work": 64 * 64 * 4 * 3 * 2})
        cli = shutil.which("schemathesis") or shutil.which("st")
        assert cli, "schemathesis installs a command line"
        done = subprocess.run(
            [cli, "run", f"{url}/openapi.json", "--checks", CHECKS, "-n", "2", "--phases", "examples,coverage,fuzzing",
             "--request-timeout", "120", "--suppress-health-check", "all", "--seed", "1",
             "-H", f"Authorization: Bearer {key}", "--no-color"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache stays out of the repo
    tail = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert "failures" not in done.stdout.splitlines()[-1] or " 0 failures" in done.stdout, tail
    print(done.stdout.splitlines()[-1], file=sys.stderr)
