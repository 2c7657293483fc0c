"""The Ray Serve application: Open Inference Protocol v2 and an image endpoint over a warm-started worker."""

# No `from __future__ import annotations` here: FastAPI resolves route parameter types at run time.

import asyncio
import functools
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from warmserve.deployments import IMPORTED, oip, oip_grpc, peers, triton
from warmserve.deployments.auth import authorized, rollout_problem
from warmserve.deployments.batcher import Batcher, BatchTimes
from warmserve.deployments.errors import BodyTooLarge, ModelNotFound, ReplicaStartError, Unauthorized
from warmserve.deployments.triton import ModelStats
from warmserve.serve.errors import InputError, NotReady
from warmserve.serve.metrics import Metrics
from warmserve.serve.settings import Settings
from warmserve.serve.spec import wire_shape
from warmserve.serve.worker import SwapReport, Worker, process_age

logger = logging.getLogger("warmserve.app")

api = FastAPI(
    title="warmserve",
    description="PyTorch inference with warm-start engine caching",
    docs_url="/docs",
    openapi_url="/openapi.json",
)


# The one error boundary: client mistakes are 4xx (a gRPC status) with a message; anything else is logged and
# answered 500 (INTERNAL).
CLIENT_ERRORS: dict[type[Exception], tuple[int, grpc.StatusCode]] = {
    InputError: (400, grpc.StatusCode.INVALID_ARGUMENT),
    Unauthorized: (401, grpc.StatusCode.UNAUTHENTICATED),
    ModelNotFound: (404, grpc.StatusCode.NOT_FOUND),
    BodyTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    NotReady: (503, grpc.StatusCode.UNAVAILABLE),
}


def client_error(e: BaseException) -> tuple[int, grpc.StatusCode] | None:
    """The HTTP and gRPC status of a client mistake, or None for a server fault: the first class of the
    exception's MRO that `CLIENT_ERRORS` maps (the most specific one), as Starlette picks its handlers."""
    return next((CLIENT_ERRORS[cls] for cls in type(e).__mro__ if cls in CLIENT_ERRORS), None)


def grpc_status(e: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and details for an error of an RPC: a client mistake's own, else INTERNAL, logged."""
    known = client_error(e)
    if known is not None:
        return known[1], str(e)
    logger.error("unhandled error in an RPC", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the client errors an endpoint can answer (all carry ``{"error": ...}``)."""
    what = {
        400: "malformed request",
        401: "missing or wrong admin token",
        404: "no such model",
        413: "body too large",
        503: "not ready",
    }
    return {
        code: {"description": what[code], "content": {"application/json": {"schema": ERROR_SCHEMA}}} for code in codes
    }


NOT_READY: dict[int | str, dict[str, Any]] = {200: {"description": "ready"}, 503: {"description": "not ready"}}


async def _client_error(request: Request, e: Exception) -> JSONResponse:
    status, _ = client_error(e) or (500, None)  # registered for CLIENT_ERRORS' classes only
    return JSONResponse({"error": str(e)}, status_code=status)


for _error in CLIENT_ERRORS:
    api.add_exception_handler(_error, _client_error)


@api.exception_handler(RequestValidationError)
async def _bad_params(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in e.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)


@api.exception_handler(Exception)
async def _server_fault(request: Request, e: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def takes_pixels(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a model input is an RGB image: [3, H, W] floats of a fixed size (it then also takes UINT8 pixels)."""
    return len(shape) == 3 and shape[0] == 3 and min(shape) > 0 and dtype.is_floating_point


@functools.lru_cache(maxsize=8)
def _pixel_affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as x * scale + shift, kept on the device: no copies per batch."""
    return (1.0 / (255.0 * IMAGENET_STD)).to(device), (-IMAGENET_MEAN / IMAGENET_STD).to(device)


def normalise_pixels(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """UINT8 RGB pixels [..., 3, H, W] -> the model's input: scaled to [0, 1], normalised with ImageNet's mean
    and standard deviation, on the device ``x`` is on, in two kernels."""
    scale, shift = _pixel_affine(x.device)
    return torch.addcmul(shift, x.to(torch.float32), scale).to(dtype)


def joined(items: list[torch.Tensor]) -> torch.Tensor:
    """The batch of ``items``, rows in order. A lone request's tensor is the batch itself: ``torch.cat`` of one
    tensor still copies it (19 MB for 32 rows of 3x224x224 FP32), and each tensor here is the request's own copy
    of what came over the wire, which nothing else holds."""
    return items[0] if len(items) == 1 else torch.cat(items)


def require_image_input(shape: tuple[int, ...]) -> None:
    """/v1/classify decodes images for models whose input is one RGB image, [3, H, W]."""
    if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
        raise InputError(f"/v1/classify needs a model of one [3, H, W] input; this one takes {list(shape)}")


def decode_image(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """JPEG/PNG bytes -> [C, H, W] UINT8 pixels: PIL decodes, `resize_crop` sizes (`normalise_pixels` next)."""
    from PIL import Image, UnidentifiedImageError

    require_image_input(shape)
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as e:
        raise InputError(
            f"the body ({len(data)} bytes) is not an image format warmserve reads; "
            "send a JPEG or PNG file as the request body (curl --data-binary @photo.jpg)"
        ) from e
    except Image.DecompressionBombError as e:
        raise InputError(f"the image is too large to decode safely: {e}") from e
    except (OSError, ValueError) as e:  # PIL's own words for a truncated or corrupt file name no objects
        raise InputError(f"the image in the body is truncated or corrupt ({e}); send a whole JPEG or PNG file") from e
    import numpy as np

    pixels = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return resize_crop(pixels, shape[1], shape[2]).contiguous()


def resize_crop(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[C, H', W'] UINT8 pixels -> [C, h, w]: the short side resized to fit (bicubic with antialiasing, as PIL
    resizes: within rounding of PIL's pixels, and 2-4x faster than PIL on the host), then cropped to the centre.
    The same on the host and on the device, so a photo's pixels do not depend on where it was decoded.
    torch's own interpolation, as torchvision's resize does it (native UINT8 on the CPU; on a GPU in float32,
    clamped and rounded back), without importing torchvision: that import takes seconds (it imports Dynamo)."""
    height, width = img.shape[-2:]
    scale = max(h / height, w / width)
    size = [max(h, round(height * scale)), max(w, round(width * scale))]
    if size != [height, width]:
        x = img.unsqueeze(0) if img.device.type == "cpu" else img.unsqueeze(0).float()
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        img = (x if x.dtype == torch.uint8 else x.clamp_(0, 255).round_().to(torch.uint8))[0]
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    return img[:, top : top + h, left : left + w]


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_jpegs(images: list[bytes], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """JPEG files -> [N, C, H, W] UINT8 pixels on a CUDA ``device`` (`decode_each`); the first file neither
    nvJPEG nor PIL can read raises PIL's `InputError`."""
    pixels = []
    for d in decode_each(images, shape, device):
        if isinstance(d, InputError):
            raise d
        pixels.append(d)
    return torch.stack(pixels)


def decode_each(images: list[bytes], shape: tuple[int, ...], device: torch.device) -> list[torch.Tensor | InputError]:
    """JPEG files -> one [C, H, W] UINT8 tensor each on a CUDA ``device``, or the `InputError` that names what is
    wrong with that file: nvJPEG decodes them in one batch and `resize_crop` sizes them there. When nvJPEG
    refuses the batch, each file is tried alone, and PIL decodes the ones nvJPEG cannot read; so a bad file
    costs only its own request."""
    from torchvision.io import ImageReadMode, decode_jpeg

    require_image_input(shape)
    try:
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        if len(images) > 1:
            logger.debug("nvJPEG refused a batch of %d; each file alone", len(images), exc_info=True)
            return [d for b in images for d in decode_each([b], shape, device)]
        try:
            return [decode_image(images[0], shape).to(device)]
        except InputError as e:
            return [e]
    out: list[torch.Tensor | InputError] = [resize_crop(img, shape[1], shape[2]) for img in decoded]
    torch.cuda.current_stream(device).synchronize()  # the engine's thread reads them on its own stream
    return out


MAX_IMAGES = 64  # files in one multipart /v1/classify request
# Tensors sent as JSON values past this many bytes are parsed, and JSON answers past this many values encoded, on
# a thread (typed gRPC contents always): one FP32 224x224 row as JSON is 3 MB and 40 ms of parsing, which would
# hold the replica's event loop (Serve's own work runs on it too). Binary tensors take microseconds, in place.
ON_A_THREAD_BYTES = 1 << 16
ON_A_THREAD_VALUES = 1 << 14
GPU_DECODE_MIN = 2  # JPEGs in one request from which a GPU replica decodes them with nvJPEG


@serve.deployment(name="WarmModel", max_ongoing_requests=128, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(api)
class WarmModel:
    """One replica: warm-starts its engine in the constructor, so it takes traffic only once ready."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        from warmserve.deployments import IMPORT_BEGAN, IMPORTED
        from warmserve.deployments.ray_metrics import RaySink

        began = time.time()
        logging.basicConfig(level=logging.INFO)
        age = process_age()
        imported = IMPORTED.get("app", began)  # absent where Ray loaded the class without importing this module
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
            # Ray sets the replica's OMP_NUM_THREADS (its num_cpus) when it takes the worker; a worker that
            # imported torch before that (a preloaded one) would run torch's default, a thread per core.
            torch.set_num_threads(int(threads))
        # Wall clock, for a scale-up's timeline beside Serve's own log (bench/load_step.py): where the time
        # between Serve starting this replica and its constructor went. In /v1/status as `process`.
        self.process_times = {
            "process_started": None if age is None else round(began - age, 3),
            "app_import_began": round(IMPORT_BEGAN, 3),
            "app_imported": round(imported, 3),
            "constructor_began": round(began, 3),
        }
        # The start report's `imports`: from the process's start to the end of the app's imports. A worker Ray
        # started ahead and preloaded did them long before Serve handed it this replica: its age is idle time.
        imports = None if age is None else max(0.0, min(age, imported - (began - age)))
        logger.info("replica %s process: %s", os.getpid(), json.dumps(self.process_times))
        self.settings = Settings.load(args=args)  # the environment is read here, once
        cache = self.settings.cache
        self.worker = Worker(
            self.settings.model,
            backend=self.settings.backend,
            device=self.settings.device,
            cache_config=cache,
            peers=peers.connect(cache.cache_dir) if cache.peers else None,
            metrics=Metrics(RaySink()),
            verify=self.settings.verify,
        )
        self.start_report = self.worker.start(imports=imports)
        self.last_swap: SwapReport | None = None
        self.weights = self.start_report.weights
        # Until Serve's first health check (right after the start-up reconfigure, if there is a user_config),
        # this replica has taken no traffic: weights it cannot load then fail its start.
        self._starting = True
        self._swaps = ThreadPoolExecutor(1, thread_name_prefix="weights-swap")  # swaps in order, off requests
        self._nvjpeg = threading.Lock()  # one batch decode at a time on the GPU
        self._nvjpeg_ready = threading.Event()  # set once a test photo decoded (`_warm_decoder`)
        self._nvjpeg_warming = False  # under _nvjpeg_start, which is never held across a decode
        self._nvjpeg_start = threading.Lock()
        self.stats = ModelStats()
        self._batcher: Batcher[list[torch.Tensor], tuple[list[torch.Tensor], str]] = Batcher(
            self._infer_batch, on_batch=self._count_batch
        )
        self._configure_batching(self.settings.max_batch_size, self.settings.batch_wait_timeout_s)
        logger.info("replica %s ready: %s", os.getpid(), self.start_report.to_dict())

    def _gpu_decoder(self) -> bool:
        """Whether nvJPEG is ready to decode a batch. Its first use starts it up on a thread of its own: the
        torchvision import it needs takes seconds (Dynamo), and nvJPEG sets itself up on its first decode (half
        a second); the replica's start and a client's request wait for neither, since PIL on the host decodes
        every photo meanwhile (and for good, if nvJPEG cannot decode a test photo)."""
        if self._nvjpeg_ready.is_set():
            return True
        with self._nvjpeg_start:
            if not self._nvjpeg_warming:
                self._nvjpeg_warming = True
                threading.Thread(target=self._warm_decoder, name="nvjpeg-warm-up", daemon=True).start()
        return False

    def _warm_decoder(self) -> None:
        from PIL import Image

        photo = io.BytesIO()
        Image.new("RGB", (32, 32), (90, 120, 60)).save(photo, "JPEG")
        t0 = time.perf_counter()
        try:
            import torchvision.io  # noqa: F401 - seconds (it imports Dynamo), outside the decode lock

            with self._nvjpeg:
                decode_jpegs([photo.getvalue()], self.settings.model.input.shape, self.worker.device)
        except Exception:  # the replica serves anyway: PIL decodes every photo
            logger.warning("nvJPEG did not decode a test photo; photos are decoded on the host", exc_info=True)
            return
        self._nvjpeg_ready.set()
        logger.info("nvJPEG ready in %.2fs; requests of several JPEGs are decoded on the GPU", time.perf_counter() - t0)

    # -- Serve hooks ---------------------------------------------------------------------------
    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Take a new ``user_config``: weights (refit, never a rebuild) and batching.

        On a live replica the swap (reading the file, validating, refitting, checking against eager) is
        queued on this replica's swap thread and reconfigure returns at once: Serve routes no requests to a
        replica while its reconfigure runs, and a slow store must not take the replica out of service. The
        old weights serve until the swap switches; `/v1/status` says what is served and what was refused
        (`warmserve rollout` waits on that). Refused weights never raise there (that would crash-loop
        replicas). On a replica that has not taken traffic yet (Serve calls this before its first health
        check when the deployment has a user_config), the swap runs before the replica is ready, and
        refused weights fail the start: a replica never serves weights other than the configured ones."""
        config = dict(config or {})
        self._configure_batching(
            int(config.get("max_batch_size", self.settings.max_batch_size)),
            float(config.get("batch_wait_timeout_s", self.settings.batch_wait_timeout_s)),
        )
        if not self._starting:
            self._swaps.submit(self._take_weights_logged, config)
            return
        problem = await asyncio.wrap_future(self._swaps.submit(self._take_weights, config))
        if problem:
            raise ReplicaStartError(
                f"this replica cannot serve the configured weights {config.get('weights_version')} "
                f"({config.get('weights')}): {problem}"
            )

    def _take_weights_logged(self, config: dict[str, Any]) -> None:
        try:
            self._take_weights(config)
        except Exception:  # the replica keeps serving its weights whatever a swap does; the log says why
            logger.exception("swap to %s failed", config.get("weights_version"))

    def _take_weights(self, config: dict[str, Any]) -> str | None:
        """Swap to the weights ``config`` names, if they are new; the reason they were refused, or None."""
        weights, version = config.get("weights"), config.get("weights_version")
        sha256 = config.get("weights_sha256") or None
        if weights is None or version is None:
            return None
        version = str(version)
        start = self.start_report
        if version == self.worker.version:
            if sha256 is None or sha256 == self.worker.weights_sha256:
                return None
            problem: str | None = (
                f"version {version} is served here from weights with sha256 "
                f"{(self.worker.weights_sha256 or '?')[:16]}..., not {sha256[:16]}...: "
                "a version label names one content"
            )
        elif version == start.weights_version and sha256 and sha256 != start.weights_sha256:
            problem = (
                f"version {version} names the weights this replica started with (sha256 "
                f"{start.weights_sha256[:16]}...), not {sha256[:16]}...: a version label names one content"
            )
        else:
            problem = rollout_problem(config, self.settings.admin_token)
        if problem is None:
            self.last_swap = self.worker.swap_weights(str(weights), version, sha256=sha256)
            if self.last_swap.ok:
                self.weights = str(weights)
                return None
            return self.last_swap.error
        logger.warning("weights %s not loaded: %s", version, problem)
        current = self.worker.version or ""
        self.last_swap = SwapReport(
            False,
            current,
            current,
            0.0,
            error=problem,
            requested=version,
            sha256=self.worker.weights_sha256 or "",
            requested_sha256=sha256 or "",
        )
        return problem

    def check_health(self) -> None:
        if not self.worker.ready:
            raise RuntimeError("engine not loaded")
        self._starting = False

    def _configure_batching(self, size: int, wait: float) -> None:
        self._batcher.configure(size, wait)

    def _count_batch(self, items: list[list[torch.Tensor]], times: BatchTimes) -> None:
        self.stats.batch(sum(x[0].shape[0] for x in items), times.queued, times.run)

    async def _infer_batch(self, items: list[list[torch.Tensor]]) -> list[tuple[list[torch.Tensor], str]]:
        """One engine call for the requests `Batcher` gathered."""
        spec = self.settings.model.input
        if len(spec.tensors) == 1 and not spec.dims:
            sizes = [x[0].shape[0] for x in items]
            outs, version = await asyncio.to_thread(self._run_batch, [x[0] for x in items])
            per_output = [torch.split(o, sizes) for o in outs]
            return [([p[i] for p in per_output], version) for i in range(len(items))]
        answers, version = await asyncio.to_thread(self.worker.run_requests, items)
        return [(a, version) for a in answers]

    def _run_batch(self, items: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
        """One engine call for the batch of a model of one input. Pixels travel as bytes: a batch of them is
        copied to the device in one piece and normalised there; one that mixes pixels and floats is normalised
        on the host."""
        dtype = self.settings.model.input.torch_dtype
        if len({x.device for x in items}) > 1:  # photos decoded on the GPU beside tensors from the wire
            items = [x.to(self.worker.device) for x in items]
        pixels = [x.dtype == torch.uint8 for x in items]
        if all(pixels) and self._pixels:
            return self.worker.run([normalise_pixels(joined(items).to(self.worker.device), dtype)])
        if any(pixels) and self._pixels:
            items = [normalise_pixels(x, dtype) if is_pixels else x for x, is_pixels in zip(items, pixels, strict=True)]
        return self.worker.run([joined(items)])

    @property
    def _pixels(self) -> bool:
        """An image model also takes UINT8 pixels."""
        spec = self.settings.model.input
        return len(spec.tensors) == 1 and takes_pixels(spec.shape, spec.torch_dtype)

    async def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        """A model of one input: its first output."""
        outs, version = await self.infer_all([x])
        return outs[0], version

    async def infer_all(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
        """Every output for one request of every input, in the signature's order."""
        # Reject a bad request alone, before it joins a batch.
        pixels = self._pixels and xs[0].dtype == torch.uint8
        checked = self.worker.check_inputs(xs, pixels=pixels)
        t0 = time.perf_counter()
        try:
            answer = await self._batcher.submit(checked)
        except Exception:
            self.stats.request(time.perf_counter() - t0, ok=False)
            raise
        self.stats.request(time.perf_counter() - t0, ok=True, rows=checked[0].shape[0])
        return answer

    def _by_name(self, named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """A request's tensors in the signature's order, matched by name (a model of one input takes any name)."""
        spec = self.settings.model.input
        if len(spec.tensors) == 1:
            if len(named) != 1:
                raise InputError(f"this model takes exactly one input tensor, got {len(named)}")
            return [named[0][1]]
        given = dict(named)
        if len(given) != len(named):
            raise InputError("the request names an input twice")
        missing = [n for n in spec.names if n not in given]
        unknown = sorted(set(given) - set(spec.names))
        if missing or unknown:
            raise InputError(
                f"this model takes inputs {', '.join(spec.names)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)}" if unknown else "")
            )
        return [given[n] for n in spec.names]

    def _named_outputs(self, outs: list[torch.Tensor], wanted: list[str]) -> dict[str, torch.Tensor]:
        """The outputs by name; only ``wanted`` ones (in that order) if the request asked for some."""
        named = {o.name: t for o, t in zip(self.worker.outputs, outs, strict=True)}
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise InputError(f"unknown output(s) {', '.join(unknown)}; this model returns {', '.join(named)}")
        return {n: named[n] for n in wanted} if wanted else named

    async def _body(self, request: Request) -> bytes:
        limit = int(self.settings.max_body_mb * 2**20)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise BodyTooLarge(f"body of {length} bytes exceeds the limit of {limit}")
        body = await request.body()
        if len(body) > limit:
            raise BodyTooLarge(f"body of {len(body)} bytes exceeds the limit of {limit}")
        return body

    def _model(self, name: str) -> None:
        if name != self.settings.model.name:
            raise ModelNotFound(f"unknown model {name!r}; this server has {self.settings.model.name!r}")

    # -- Open Inference Protocol v2 --------------------------------------------------------------
    @api.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "warmserve",
            "version": "0.1.0",
            # Not "statistics": its counts are the answering replica's, which Triton's tools would subtract
            # across replicas (perf_analyzer reads them only where the server lists the extension).
            "extensions": ["binary_tensor_data", "model_configuration"],
        }

    @api.get("/v2/health/live", response_class=Response, responses={200: {"description": "the server is up"}})
    async def live(self) -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready", response_class=Response, responses=NOT_READY)
    async def ready(self) -> Response:
        return Response(status_code=200 if self.worker.ready else 503)

    @api.get("/v2/models/{name}", responses=errors(400, 404))
    async def model_metadata(self, name: str) -> dict[str, Any]:
        return self._metadata(name)

    def _metadata(self, name: str) -> dict[str, Any]:
        self._model(name)
        spec = self.settings.model
        return {
            "name": spec.name,
            "versions": [self.worker.version],
            "platform": f"warmserve_{self.worker.backend.name}",
            "inputs": [
                {
                    "name": t.name,
                    "datatype": oip.TORCH_TO_DATATYPE[t.torch_dtype],
                    "shape": wire_shape(t.shape),
                }
                for t in spec.input.tensors
            ],
            "outputs": [
                {
                    "name": o.name,
                    "datatype": oip.TORCH_TO_DATATYPE.get(getattr(torch, o.dtype), o.dtype.upper()),
                    "shape": wire_shape(o.shape),
                }
                for o in self.worker.outputs
            ],
            "parameters": {
                "weights_version": self.worker.version,
                "backend": self.worker.backend.name,
                "device": str(self.worker.device),
                "start": self.start_report.to_dict(),
                "last_swap": self.last_swap.to_dict() if self.last_swap else None,
                "replica_pid": os.getpid(),
            },
        }

    @api.get("/v2/models/{name}/config", responses=errors(400, 404))
    async def model_config(self, name: str) -> dict[str, Any]:
        """Triton's model configuration extension: what Triton's tools (perf_analyzer...) read first."""
        return self._config(name)

    def _config(self, name: str) -> dict[str, Any]:
        self._model(name)
        batcher = self._batcher
        return triton.model_config(
            name,
            self.settings.model.input,
            self.worker.outputs,
            backend=self.worker.backend.name,
            batch_wait_timeout_s=batcher.batch_wait_timeout_s,
            max_batch_size=batcher.max_batch_size,
            parameters={"weights_version": self.worker.version or "", "device": str(self.worker.device)},
        )

    @api.get("/v2/models/{name}/stats", responses=errors(400, 404))
    async def model_stats(self, name: str) -> dict[str, Any]:
        """Triton's statistics document of the replica that answers: its counts and times since it started."""
        self._model(name)
        return self.stats.doc(name, self.worker.version or "")

    @api.get("/v2/models/{name}/ready", response_class=Response, responses={**NOT_READY, **errors(400, 404)})
    async def model_ready(self, name: str) -> Response:
        self._model(name)
        return Response(status_code=200 if self.worker.ready else 503)

    @api.post(
        "/v2/models/{name}/infer",
        responses={
            200: {
                "description": "the outputs (binary when asked for, with Inference-Header-Content-Length)",
                "content": {
                    "application/json": {"schema": oip.INFER_RESPONSE_SCHEMA},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **errors(400, 404, 413, 503),
        },
        openapi_extra={
            "parameters": [
                {
                    "name": "Inference-Header-Content-Length",
                    "in": "header",
                    "required": False,
                    "description": "binary extension: length of the JSON header; tensor bytes follow it",
                    "schema": {"type": "integer", "minimum": 0},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": oip.INFER_REQUEST_SCHEMA},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
        },
    )
    async def v2_infer(self, name: str, request: Request) -> Response:
        self._model(name)
        body = await self._body(request)
        header = request.headers.get(oip.HEADER_LENGTH)
        json_bytes = int(header) if header is not None and header.isdigit() else len(body)
        if json_bytes > ON_A_THREAD_BYTES:
            req = await asyncio.to_thread(oip.parse_request, body, header)
        else:
            req = oip.parse_request(body, header)
        named = [(str(item["name"]), t) for item, t in zip(req.inputs, req.tensors, strict=True)]
        wanted = [str(o.get("name")) for o in req.outputs if isinstance(o, dict) and "name" in o]
        outs, version = await self.infer_all(self._by_name(named))
        outputs = self._named_outputs(outs, wanted)
        encode = functools.partial(oip.encode_response, name, version, req.id, outputs, req.binary_output)
        if not req.binary_output and sum(t.numel() for t in outputs.values()) > ON_A_THREAD_VALUES:
            answer, headers = await asyncio.to_thread(encode)
        else:
            answer, headers = encode()
        return Response(answer, headers=headers)

    # -- Open Inference Protocol over gRPC ----------------------------------------------------------
    # Serve's gRPC proxy calls the method named as the RPC with the decoded request (deployments/oip_grpc.py);
    # the names are the protocol's.
    async def _rpc(self, grpc_context: Any, empty: Any, call: Any) -> Any:
        try:
            return await call()
        except Exception as e:
            code, details = grpc_status(e)
            if grpc_context is not None:
                grpc_context.set_code(code)
                grpc_context.set_details(details)
            return empty()

    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:
        return oip_grpc.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:
        return oip_grpc.ServerReadyResponse(ready=self.worker.ready)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        return oip_grpc.ServerMetadataResponse(**await self.server_metadata())

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:
        async def call() -> Any:
            self._model(request.name)
            return oip_grpc.ModelReadyResponse(ready=self.worker.ready)

        return await self._rpc(grpc_context, oip_grpc.ModelReadyResponse, call)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        async def call() -> Any:
            return oip_grpc.model_metadata(self._metadata(request.name))

        return await self._rpc(grpc_context, oip_grpc.ModelMetadataResponse, call)

    async def ModelConfig(self, request: Any, grpc_context: Any = None) -> Any:
        async def call() -> Any:
            return oip_grpc.model_config(self._config(request.name))

        return await self._rpc(grpc_context, oip_grpc.ModelConfigResponse, call)

    async def ModelStatistics(self, request: Any, grpc_context: Any = None) -> Any:
        async def call() -> Any:
            return oip_grpc.model_statistics(await self.model_stats(request.name))

        return await self._rpc(grpc_context, oip_grpc.ModelStatisticsResponse, call)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:
        async def call() -> Any:
            self._model(request.model_name)
            limit = int(self.settings.max_body_mb * 2**20)
            if not request.raw_input_contents:  # typed contents: a Python value per element
                tensors = await asyncio.to_thread(oip_grpc.parse_infer, request, limit)
            else:
                tensors = oip_grpc.parse_infer(request, limit)
            named = [(item.name, t) for item, t in zip(request.inputs, tensors, strict=True)]
            outs, version = await self.infer_all(self._by_name(named))
            outputs = self._named_outputs(outs, [o.name for o in request.outputs])
            return oip_grpc.infer_response(request.model_name, version, request.id, outputs)

        return await self._rpc(grpc_context, oip_grpc.ModelInferResponse, call)

    # -- Images ------------------------------------------------------------------------------------
    @api.post(
        "/v1/classify",
        responses=errors(400, 413, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "description": f"up to {MAX_IMAGES} images, each a file part; answered in order",
                            "additionalProperties": {"type": "string", "format": "binary"},
                        }
                    },
                },
            }
        },
    )
    async def classify(self, request: Request, top_k: int | None = None) -> dict[str, Any]:
        """One image as the body, or several as the files of a multipart form (``curl -F a=@1.jpg -F
        b=@2.jpg``): one engine batch for all of them, answered ``{"results": [{"file", "top_k"}...]}``."""
        k = self.settings.top_k if top_k is None else top_k
        if not 1 <= k <= len(self.worker.labels):
            raise InputError(f"top_k must be between 1 and {len(self.worker.labels)}")
        body = await self._body(request)
        form = request.headers.get("content-type", "").startswith("multipart/form-data")
        names, images = await self._form_files(request) if form else ([""], [body])
        out, version = await self.infer(await self._decode(images, names if form else None))
        answers = [self._top_k(row, k) for row in out]
        doc: dict[str, Any] = {"model": self.settings.model.name, "weights_version": version}
        if form:
            doc["results"] = [{"file": n, "top_k": a} for n, a in zip(names, answers, strict=True)]
        else:
            doc["top_k"] = answers[0]
        return doc

    async def _form_files(self, request: Request) -> tuple[list[str], list[bytes]]:
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException

        try:
            form = await request.form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES)
        except HTTPException as e:  # Starlette's words for a malformed form or too many parts
            raise InputError(f"the multipart body cannot be read: {e.detail}") from e
        files = [(v.filename or key, v) for key, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise InputError(
                "the multipart body holds no files; send each image as a file part (curl -F a=@1.jpg -F b=@2.jpg)"
            )
        return [name for name, _ in files], [await f.read() for _, f in files]

    async def _decode(self, images: list[bytes], names: list[str] | None = None) -> torch.Tensor:
        """[N, C, H, W] UINT8 pixels. On a GPU replica, a request with several JPEGs has them decoded by nvJPEG
        in one batch; one photo is decoded by PIL on the host, as on a CPU replica: replicas that share a GPU
        take turns on it, and many small decodes cost more in those turns than on a host core (README, Measured).
        With ``names`` (a form's files), an image that cannot be read is named in the error."""
        shape = self.settings.model.input.shape
        require_image_input(shape)
        named: list[str | None] = list(names) if names else [None] * len(images)

        def on_gpu() -> list[torch.Tensor | InputError]:
            with self._nvjpeg:
                return decode_each(images, shape, self.worker.device)

        def one(data: bytes) -> torch.Tensor | InputError:
            try:
                return decode_image(data, shape)
            except InputError as e:
                return e

        gpu = self.worker.device.type == "cuda" and len(images) >= GPU_DECODE_MIN and all(map(is_jpeg, images))
        if gpu and self._gpu_decoder():
            decoded = await asyncio.to_thread(on_gpu)
        else:
            decoded = await asyncio.gather(*(asyncio.to_thread(one, b) for b in images))
        pixels = []
        for d, name in zip(decoded, named, strict=True):
            if isinstance(d, InputError):
                raise InputError(f"file {name!r}: {d}" if name else str(d)) from d
            pixels.append(d)
        return torch.stack(pixels)

    def _top_k(self, row: torch.Tensor, k: int) -> list[dict[str, Any]]:
        scores, idx = torch.softmax(row.float(), dim=0).topk(k)
        return [
            {"label": self.worker.labels[i], "index": int(i), "score": round(float(s), 6)}
            for s, i in zip(scores.tolist(), idx.tolist(), strict=True)
        ]

    @api.get("/v1/status", responses=errors(401))
    async def status(self, request: Request) -> dict[str, Any]:
        if not authorized(request.headers.get("authorization"), self.settings.admin_token):
            raise Unauthorized("this endpoint needs Authorization: Bearer <WARMSERVE_ADMIN_TOKEN>")
        return {
            "replica_pid": os.getpid(),
            "replica": serve.get_replica_context().replica_id.unique_id,  # the `replica` label of its metrics
            "ready": self.worker.ready,
            "weights_version": self.worker.version,
            "weights": self.weights,
            "weights_sha256": self.worker.weights_sha256,
            "unexpected_compiles": self.worker.fence.unexpected if self.worker.fence else None,
            "start": self.start_report.to_dict(),
            "process": self.process_times,
            "last_swap": self.last_swap.to_dict() if self.last_swap else None,
        }


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``import_path: warmserve.deployments.app:build_app`` (config.yaml ``args``)."""
    Settings.load(args=args)  # fail at deploy time, with the offending key, not in every replica
    return WarmModel.bind(args)  # type: ignore[attr-defined]


IMPORTED["app"] = time.time()  # last: this module and everything it imports are loaded
