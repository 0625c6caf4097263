"""Datasets for training, per user: upload a zip, list, read, caption, delete.

A training itself is a job (``POST /api/v1/jobs`` with ``type: "train_lora"`` and lora-scripts'
options as ``params``), on the same queue as generation; its progress carries ``loss``, ``lr`` and
``epoch``, and each saved epoch is announced with a ``saved`` event.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from ..errors import InvalidRequestError
from ..training.dataset import IMAGE_EXTS, describe
from . import training
from .core import Service
from .store import User


class CaptionIn(BaseModel):
    image: str
    caption: str


def install(app: FastAPI, service: Service) -> None:
    current_user = app.state.current_user
    r = APIRouter(tags=["training"])

    def limit_of(user: User) -> int:
        return service.settings.limits.merged(user.limits).max_dataset_bytes

    @r.put("/api/v1/datasets/{name}", status_code=201,
           # Declared as octet-stream (a zip's bytes): any Content-Type is read the same way.
           openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                                          "required": True}})
    async def upload(name: str, request: Request, user: User = Depends(current_user)) -> dict[str, Any]:
        """A zip of kohya folders (``10_sks dog/img.png`` + ``img.txt``), or of loose images (put into
        ``<n>_zkz/`` as lora-scripts does). Replaces a dataset of the same name."""
        training.dataset_dir(service.dirs.root, user.name, name)  # the name is checked before reading the body
        limit = limit_of(user)
        with tempfile.TemporaryFile() as tmp:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise InvalidRequestError(f"the zip is over your dataset limit of {limit} bytes (max_dataset_bytes)")
                tmp.write(chunk)
            if size == 0:
                raise InvalidRequestError("send the dataset as a zip in the request body (Content-Type: application/zip)")
            tmp.seek(0)
            data = tmp.read()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, training.save_upload, service.dirs.root, user.name, name, data, limit)

    @r.get("/api/v1/datasets")
    def datasets(user: User = Depends(current_user)) -> dict[str, Any]:
        return {"datasets": training.list_datasets(service.dirs.root, user.name)}

    @r.get("/api/v1/datasets/{name}")
    def dataset(name: str, user: User = Depends(current_user)) -> dict[str, Any]:
        folder = training.dataset_dir(service.dirs.root, user.name, name)
        if not folder.is_dir():
            raise HTTPException(404, f"no dataset {name!r}")
        return describe(folder)

    @r.get("/api/v1/datasets/{name}/images/{folder}/{file}", response_class=FileResponse,
           responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}})
    def dataset_image(name: str, folder: str, file: str, user: User = Depends(current_user)) -> FileResponse:
        base = training.dataset_dir(service.dirs.root, user.name, name)
        path = (base / folder / file).resolve()
        if base.resolve() not in path.parents or path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
            raise HTTPException(404, f"no image {folder}/{file} in dataset {name!r}")
        return FileResponse(path)

    @r.put("/api/v1/datasets/{name}/captions")
    def caption(name: str, body: CaptionIn, user: User = Depends(current_user)) -> dict[str, Any]:
        training.set_caption(service.dirs.root, user.name, name, body.image, body.caption)
        return {"image": body.image, "caption": body.caption.strip()}

    @r.delete("/api/v1/datasets/{name}")
    def delete(name: str, user: User = Depends(current_user)) -> dict[str, Any]:
        folder = training.dataset_dir(service.dirs.root, user.name, name)
        if not folder.is_dir():
            raise HTTPException(404, f"no dataset {name!r}")
        shutil.rmtree(folder)
        return {"deleted": name}

    app.include_router(r)
