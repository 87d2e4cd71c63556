"""The HTTP API (FastAPI) and the search page.

Images are addressed by their database id only, never by a path from the
request, and an image file is served only while its content is what was
indexed (size and SHA-256 of its row): a file swapped for a symlink to
anything else is refused. Every error is JSON with a fitting status code.
Requests run in parallel on the server's threads: the engine lets searches
share its read-only state.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import tempfile
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.decode import BadImage, decode_image
from indexer.verify import FileChanged, read_if_unchanged

from ..engine import CaptionHit, ImageHit
from ..errors import ImageUnusable, XmrError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 100
MAX_ID = 2**63 - 1
THUMB_SIZE = 256


class ErrorBody(BaseModel):
    error: str
    status: int


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def create_app(engine, title: str = "xmr") -> FastAPI:
    app = FastAPI(title=title, version="0.1.0", description="Search images by text, captions by image.",
                  responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}})
    thumbs: dict[int, bytes] = {}

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", []))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(XmrError)
    async def _xmr_error(request: Request, exc: XmrError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, "internal error; see the server log")

    @app.get("/api/search", response_model=list[ImageHit])
    def search(q: str = Query(..., min_length=1, max_length=1000, description="What to look for"),
               k: int = Query(20, ge=1, le=MAX_K), rerank: bool = True):
        hits = engine.search(q, k=k, rerank=rerank)
        return [h.to_dict() for h in hits]

    @app.post("/api/caption", response_model=list[CaptionHit])
    def caption(file: UploadFile = File(...), k: int = Query(5, ge=1, le=MAX_K), rerank: bool = True):
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                hits = engine.caption(tmp.name, k=k, rerank=rerank)
            except ImageUnusable as exc:  # decoded once, by the engine (large JPEGs at reduced size)
                raise HTTPException(415 if exc.reason == "not an image" else 422,
                                    f"unusable image: {exc.reason}: {exc.detail}") from None
        return [h.to_dict() for h in hits]

    @app.get("/api/captions/{image_id}", response_model=list[CaptionHit])
    def captions_of(image_id: int = PathParam(..., ge=0, le=MAX_ID), k: int = Query(5, ge=1, le=MAX_K), rerank: bool = True):
        path = engine.image_path(image_id)
        if path is None:
            raise HTTPException(404, "no such image in the index")
        hits = engine.caption(path, k=k, rerank=rerank)
        return [h.to_dict() for h in hits]

    @app.get("/api/similar/{image_id}", response_model=list[ImageHit])
    def similar(image_id: int = PathParam(..., ge=0, le=MAX_ID), k: int = Query(20, ge=1, le=MAX_K)):
        if engine.image_path(image_id) is None:
            raise HTTPException(404, "no such image in the index")
        hits = engine.similar_id(image_id, k=k)
        return [h.to_dict() for h in hits]

    @app.get("/api/status")
    def status():
        return engine.status()

    def _indexed_bytes(image_id: int) -> tuple[str, bytes]:
        """(path, content) of an indexed image whose file is still the one indexed."""
        f = engine.image_file(image_id)
        if f is None:
            raise HTTPException(404, "no such image in the index")
        try:
            return f.path, read_if_unchanged(f.path, f.size, f.sha256)
        except FileChanged as exc:
            log.warning("not serving image %d (%s): %s", image_id, f.path, exc)
            raise HTTPException(404, f"the image file changed since it was indexed ({exc}); "
                                     "run xmr index on its folder to update the index") from None

    @app.get("/api/image/{image_id}", response_class=Response)
    def image(image_id: int = PathParam(..., ge=0, le=MAX_ID)):
        path, data = _indexed_bytes(image_id)
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return Response(data, media_type=kind if kind.startswith("image/") else "application/octet-stream",
                        headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/api/thumb/{image_id}", response_class=Response)
    def thumb(image_id: int = PathParam(..., ge=0, le=MAX_ID)):
        if image_id not in thumbs:
            path, data = _indexed_bytes(image_id)
            try:
                img = decode_image(path, THUMB_SIZE, data).image
            except BadImage as exc:
                raise HTTPException(404, f"image no longer readable: {exc.reason}") from None
            img.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            if len(thumbs) > 5000:
                thumbs.clear()
            thumbs[image_id] = buf.getvalue()
        return Response(thumbs[image_id], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
