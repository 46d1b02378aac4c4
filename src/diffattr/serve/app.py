"""The web app of ``diffattr serve`` (Starlette): a page and a JSON API over a run's index.

Routes (``docs/serve.md``):

- ``GET /``: the page (drop or choose an image, or pick a generated sample; the answer).
- ``GET /api/info``: the run, the method, the training set's size and image shape, the number
  of generated samples, the upload limit, whether images need a caption (text-to-image).
- ``POST /api/query?name=FILE[&caption=TEXT]``: the image's bytes as the body (PNG or JPEG):
  its answer. ``POST /api/query?sample=I``: the answer for the run's generated sample I.
- ``GET /api/images/train/ID``, ``GET /api/images/sample/I``: a training image by id, a
  generated sample by position, as PNG — rendered from the run's data, never read from a path
  the request names, so nothing but the run's own images can be served.

An answer is what ``diffattr query --json`` gives for one image: the method; ``target`` (id,
source, caption, near-copy flag, κ with its held-out percentile and bin); ``answer``
(``topk.json``'s row: proponents and opponents with scores and names); ``calibration`` (which
benchmark the bin comes from and each bin's measured LDS there, or why there is none).

Uploads are refused with a 4xx and a message — too large (413), not an image, the wrong
number of channels or size (400) — and the server keeps running. Queries are answered one at
a time (the index's state is shared); each featurizes its image in a temporary directory and
leaves the run directory unchanged.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from diffattr.errors import DiffattrError

#: Default upload limit in bytes.
MAX_UPLOAD_BYTES = 10 * 2**20
#: Pixels on the long side of a served thumbnail (nearest-neighbour upscaling).
THUMBNAIL = 96


class QueryService:
    """What the app's routes call: one run's index, answers and images (thread-safe)."""

    def __init__(self, run: Any, method: str, given: dict, index_kwargs: dict, k: int) -> None:
        from diffattr.attribution.methods.spec import method_label
        from diffattr.families import open_run

        self.run, self.k = run, k
        self.bound = open_run(run)
        self.index = self.bound.index(method, given, **index_kwargs)
        self.index.attributor.progress = False  # no progress bar per query on the console
        self.label = method_label(method, given)
        self.pictures = run.data_spec().load()  # (train, val) as pictures
        self.lock = threading.Lock()
        self._samples: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ answers
    def _answers(self, spec: str, cache: bool) -> list[dict[str, Any]]:
        from diffattr.commands.attribute import NamedAnswers

        with self.lock:
            scores = self.index.score(spec, cache=cache)
            named = NamedAnswers(self.run, self.bound, spec, self.pictures, cache)
            named.add(self.label, scores)
            calibration = calibration_of(scores)
            rows = scores.topk_rows(self.k)
        return [
            {"method": self.label, "target": t, "answer": a, "calibration": calibration}
            for t, a in zip(named.per_target, rows, strict=True)
        ]

    def sample_answer(self, i: int) -> dict[str, Any]:
        """The answer for generated sample ``i`` (all samples are answered once, then kept)."""
        if self._samples is None:
            self._samples = self._answers("samples", cache=True)
        if not 0 <= i < len(self._samples):
            raise KeyError(i)
        return self._samples[i]

    def upload_answer(self, data: bytes, name: str, caption: str | None) -> dict[str, Any]:
        """The answer for an uploaded image (checked: a PNG or JPEG the run can take)."""
        suffix = check_image(data)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "upload").stem)[:80] or "upload"
        with tempfile.TemporaryDirectory(prefix="diffattr-upload-") as tmp:
            path = Path(tmp) / f"{stem}{suffix}"
            path.write_bytes(data)
            if caption:
                (Path(tmp) / "captions.json").write_text(json.dumps({path.name: caption}))
            return self._answers(tmp, cache=False)[0]

    # ------------------------------------------------------------------ images and facts
    def num_samples(self) -> int:
        path = self.run.samples_dir / "samples.npz"
        if not path.is_file():
            return 0
        with np.load(path, allow_pickle=False) as z:
            return int(z["seeds"].shape[0])

    def train_png(self, image_id: int) -> bytes:
        train = self.pictures[0]
        where = np.flatnonzero(train.ids.numpy() == image_id)
        if where.size == 0:
            raise KeyError(image_id)
        return png_bytes(train.images[int(where[0])])

    def sample_png(self, i: int) -> bytes:
        _, images, _ = self.bound.family.images(self.run, "samples")
        if not 0 <= i < images.shape[0]:
            raise KeyError(i)
        return png_bytes(images[i])

    def info(self, max_upload: int) -> dict[str, Any]:
        train = self.pictures[0]
        return {
            "run": self.run.path.name,
            "family": self.bound.family.name,
            "method": self.label,
            "num_train": len(train),
            "image_shape": list(train.images.shape[1:]),
            "samples": self.num_samples(),
            "k": self.k,
            "max_upload_bytes": max_upload,
            "needs_caption": self.bound.family.name.endswith("text2image"),
        }


def check_image(data: bytes) -> str:
    """The file suffix of an uploaded PNG or JPEG, or a :class:`DataError` saying what it is
    instead (empty, not an image, another format)."""
    from PIL import Image, UnidentifiedImageError

    from diffattr.errors import DataError

    if not data:
        raise DataError("the upload is empty: send the image's bytes as the request body")
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"the upload is not an image PIL can read ({exc})") from None
    if kind not in ("PNG", "JPEG"):
        raise DataError(f"the upload is a {kind} image; send a PNG or JPEG")
    return ".png" if kind == "PNG" else ".jpg"


def png_bytes(image_chw: Any) -> bytes:
    """A C×H×W image in [-1, 1] as PNG bytes, upscaled (nearest) to about THUMBNAIL pixels."""
    from PIL import Image

    from diffattr.data.images import to_uint8_images

    arr = to_uint8_images(image_chw)[0]
    im = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr)
    scale = max(1, THUMBNAIL // max(im.size))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def calibration_of(scores: Any) -> dict[str, Any]:
    """Where κ's bins come from: ``{"benchmark", "bins": {bin: {"real", "generated"}}}`` (the
    measured mean LDS of each bin on the benchmark's real and generated targets) or
    ``{"why": …}`` when the bins do not apply."""
    entry, why = scores.calibration()
    if entry is None:
        return {"benchmark": None, "why": why}
    bench = why.removeprefix("calibrated on ")
    lds = entry.get("lds", {}).get(bench, {})
    bins: dict[str, dict[str, Any]] = {}
    for kind, key in (("val", "real"), ("gen", "generated")):
        for row in lds.get(kind, []):
            bins.setdefault(row["bin"], {})[key] = {"mean": row["mean"], "ci": row["ci"]}
    return {"benchmark": bench, "why": why, "bins": bins}


def make_app(
    run: Any,
    method: str = "das",
    given: dict[str, Any] | None = None,
    index_kwargs: dict[str, Any] | None = None,
    k: int = 10,
    max_upload: int = MAX_UPLOAD_BYTES,
) -> Any:
    """The Starlette app serving ``run`` (a :class:`~diffattr.run.RunDir`) with ``method``
    (module docstring); its index is built first when missing."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    service = QueryService(run, method, dict(given or {}), dict(index_kwargs or {}), k)
    page = resources.files("diffattr.serve").joinpath("assets/page.html").read_text()

    def error(status: int, message: str, hint: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "hint": hint}, status_code=status)

    def index_page(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    def info(request: Request) -> JSONResponse:
        return JSONResponse(service.info(max_upload))

    async def query(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        params = request.query_params
        if "sample" in params:
            try:
                answer = await run_in_threadpool(service.sample_answer, int(params["sample"]))
            except (KeyError, ValueError):
                return error(404, f"no generated sample {params['sample']!r} in this run")
            return JSONResponse(answer)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload:
            return error(413, f"the upload is {int(declared)} bytes; the limit is {max_upload}")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_upload:
                return error(413, f"the upload is over the limit of {max_upload} bytes")
        try:
            answer = await run_in_threadpool(
                service.upload_answer, bytes(body), params.get("name", ""), params.get("caption")
            )
        except DiffattrError as exc:
            return error(400, str(exc), exc.hint)
        return JSONResponse(answer)

    def image(request: Request) -> Response:
        kind, key = request.path_params["kind"], request.path_params["key"]
        if kind not in ("train", "sample"):
            return error(404, f"no images of kind {kind!r} (train or sample)")
        try:
            number = int(key)
            png = service.train_png(number) if kind == "train" else service.sample_png(number)
        except (KeyError, ValueError):
            return error(404, f"no {kind} image {key!r} in this run")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    routes = [
        Route("/", index_page),
        Route("/api/info", info),
        Route("/api/query", query, methods=["POST"]),
        Route("/api/images/{kind:str}/{key:str}", image),
    ]
    app = Starlette(routes=routes)
    app.state.service = service
    return app
