"""warmserve's engine behind LitServe: the ``litserve:N`` mode of bench/serve_throughput.py.

python -m bench.litserve_app --endpoint oip --port 8000 --workers 2 --cache-dir CACHE --weights v1.safetensors

Each LitServe inference worker loads the engine as a warmserve replica does (`serve.worker.Worker` on the same
engine cache: a hit, not a rebuild) and answers what warmserve answers on the same path: OIP requests on
``/v2/models/<name>/infer`` (``--endpoint oip``) or JPEG/PNG bodies on ``/v1/classify`` (``--endpoint
classify``), parsed, normalised and encoded by warmserve's own functions. LitServe batches them: up to
``--max-batch`` requests, waiting ``--batch-wait`` seconds for more. A request is one item of that batch however
many rows it has (as in Serve's batching): its rows go to the engine together and come back together.

Set-up differences from LitServe's defaults, all to keep the comparison to the same work: the body reaches
``decode_request`` as bytes (LitServe would parse it as JSON), responses are not gzipped (warmserve does not
compress; LitServe would for any client that accepts gzip), no server-side request timeout (the bench's clients
give up after 120 s in every mode), no client.py written.
"""

# No `from __future__ import annotations` here: LitServe reads decode_request's annotation at run time.

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import requests
from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.gzip import GZipMiddleware

ROOT = Path(__file__).resolve().parents[1]


async def raw_body(request: Request) -> tuple[bytes, str | None]:
    """The body as sent, and the OIP binary extension's header length."""
    return await request.body(), request.headers.get("inference-header-content-length")


# As decode_request's annotation this makes LitServe pass the dependency's result, not ``await request.json()``.
RawBody = Annotated[tuple[bytes, str | None], Depends(raw_body)]


class _Engine(ls.LitAPI):
    """The engine of one inference worker; ``predict`` takes a batch of requests (each a tensor of rows, or
    the InputError that refused it) and answers each with its own rows."""

    def __init__(self, engine: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine = engine

    def setup(self, device: str) -> None:
        import torch

        from warmserve.cache import CacheConfig
        from warmserve.deployments.app import normalise_pixels, takes_pixels
        from warmserve.serve.spec import ModelSpec
        from warmserve.serve.worker import Worker

        e = self.engine
        if device == "cpu":
            torch.set_num_threads(e["threads"])  # as many as a replica of ``num_cpus`` threads gets
        spec = ModelSpec.from_mapping({"model": e["model"], "weights": e["weights"], "batch": f"1:{e['max_batch']}"})
        self.worker = Worker(
            spec, backend=e["backend"], device=device, cache_config=CacheConfig.load(cache_dir=e["cache_dir"])
        )
        report = self.worker.start()
        self.normalise = normalise_pixels
        self.pixels = takes_pixels(spec.input.shape, spec.input.torch_dtype)
        # Read by the bench once /health says every worker is ready, which is after this returns.
        Path(e["report_dir"], f"{os.getpid()}.json").write_text(json.dumps(report.to_dict()))

    def check(self, x: Any) -> Any:
        """``x``, or the InputError warmserve would answer 400 (an image model also takes UINT8 pixels)."""
        import torch

        from warmserve.serve.errors import InputError

        try:
            return self.worker.check_input(x, dtype=torch.uint8 if self.pixels else None)
        except InputError as e:
            return e

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs  # rows are joined in predict, where each request's row count is known

    def predict(self, items: list[Any]) -> list[Any]:
        """One engine call for the batch, as warmserve's replica makes it: pixels copied to the device in one
        piece and normalised there; a batch that mixes pixels and floats is normalised on the host."""
        import torch

        ok = [item for item in items if not isinstance(item, Exception)]
        if not ok:
            return items
        xs = [x for x, _ in ok]
        dtype = self.worker.spec.input.torch_dtype
        if all(x.dtype == torch.uint8 for x in xs):
            out, version = self.worker.infer_versioned(self.normalise(torch.cat(xs).to(self.worker.device), dtype))
        else:
            xs = [self.normalise(x, dtype) if x.dtype == torch.uint8 else x for x in xs]
            out, version = self.worker.infer_versioned(torch.cat(xs))
        rows = iter(torch.split(out, [x.shape[0] for x in xs]))
        return [item if isinstance(item, Exception) else (next(rows), version, item[1]) for item in items]

    @staticmethod
    def refused(e: Exception) -> Response:
        # A Response, not an HTTPException: LitServe would answer the exception to every request of the batch.
        return JSONResponse({"error": str(e)}, status_code=400)


class OipAPI(_Engine):
    """``/v2/models/<name>/infer``: OIP JSON or binary requests of one input tensor."""

    def decode_request(self, request: RawBody) -> Any:
        from warmserve.deployments.oip import parse_request
        from warmserve.serve.errors import InputError

        body, header_length = request
        try:
            req = parse_request(body, header_length)
        except InputError as e:
            return e
        if len(req.tensors) != 1:
            return InputError(f"this model takes exactly one input tensor, got {len(req.tensors)}")
        x = self.check(req.tensors[0])
        return x if isinstance(x, Exception) else (x, (req.id, req.binary_output))

    def encode_response(self, output: Any) -> Response:
        from warmserve.deployments.oip import encode_response

        if isinstance(output, Exception):
            return self.refused(output)
        out, version, (request_id, binary) = output
        body, headers = encode_response(self.worker.spec.name, version, request_id, {"output__0": out}, binary)
        return Response(body, headers=headers)


class ClassifyAPI(_Engine):
    """``/v1/classify``: a JPEG or PNG body, answered with the top 5 labels as warmserve answers it."""

    top_k = 5

    def decode_request(self, request: RawBody) -> Any:
        from warmserve.deployments.app import decode_image
        from warmserve.serve.errors import InputError

        try:
            x = decode_image(request[0], self.worker.spec.input.shape).unsqueeze(0)
        except InputError as e:
            return e
        x = self.check(x)
        return x if isinstance(x, Exception) else (x, None)

    def encode_response(self, output: Any) -> Response:
        import torch

        if isinstance(output, Exception):
            return self.refused(output)
        out, version, _ = output
        scores, idx = torch.softmax(out[0].float(), dim=0).topk(self.top_k)
        labels = self.worker.labels
        return JSONResponse(
            {
                "model": self.worker.spec.name,
                "weights_version": version,
                "top_k": [
                    {"label": labels[i], "index": int(i), "score": round(float(s), 6)}
                    for s, i in zip(scores.tolist(), idx.tolist(), strict=True)
                ],
            }
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", choices=["oip", "classify"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1, help="LitServe's workers_per_device (one device)")
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--backend", default="aoti")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--max-batch", type=int, default=32, help="the engine's largest batch and LitServe's batch")
    ap.add_argument("--batch-wait", type=float, default=0.005, help="LitServe's batch_timeout, seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker on the CPU")
    ap.add_argument("--report-dir", required=True, help="where each worker writes its start report")
    args = ap.parse_args()

    from warmserve.serve.spec import ModelSpec

    name = ModelSpec(model=args.model).name
    engine = {
        "model": args.model,
        "weights": args.weights,
        "backend": args.backend,
        "cache_dir": args.cache_dir,
        "max_batch": args.max_batch,
        "threads": args.threads,
        "report_dir": args.report_dir,
    }
    batching = {"max_batch_size": args.max_batch, "batch_timeout": args.batch_wait}
    if args.endpoint == "oip":
        api: _Engine = OipAPI(engine, api_path=f"/v2/models/{name}/infer", **batching)
    else:
        api = ClassifyAPI(engine, api_path="/v1/classify", **batching)
    server = ls.LitServer(api, accelerator=args.device, devices=1, workers_per_device=args.workers, timeout=False)
    server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not GZipMiddleware]
    # One HTTP server process per inference worker: what LitServe starts by default for one API.
    server.run(
        host="127.0.0.1", port=args.port, num_api_servers=args.workers, generate_client_file=False, log_level="warning"
    )


# -- the bench's side ------------------------------------------------------------------------------------------


def _group_members(pgid: int) -> list[int]:
    """Live processes of the process group ``pgid`` (the server and everything it started); zombies, which
    hold nothing, left out."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, _, group = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                found.append(int(pid))
    return found


@contextlib.contextmanager
def litserve_server(
    endpoint: str, workers: int, port: int, workdir: Path, options: list[str], timeout: float = 900
) -> Iterator[list[dict[str, Any]]]:
    """This module's server in its own process group, on ``port``; yields the workers' start reports once
    every worker is ready. Stopped as Ctrl+C stops it (LitServe's graceful shutdown), then whatever of its
    group is left is killed."""
    reports = workdir / f"reports-{endpoint}"
    reports.mkdir(parents=True, exist_ok=True)
    log = workdir / f"litserve-{endpoint}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),  # only warmserve's cache helps, as for replicas
    }
    cmd = [sys.executable, "-m", "bench.litserve_app", "--endpoint", endpoint, "--port", str(port)]
    cmd += ["--workers", str(workers), "--report-dir", str(reports), *options]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"LitServe exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"LitServe not ready after {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _group_members(proc.pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            time.sleep(2)
        proc.wait(10)
        if _group_members(proc.pid):
            raise RuntimeError(f"LitServe left processes behind: {_group_members(proc.pid)}")


if __name__ == "__main__":
    main()
