"""Which CUDA-graph set-up survives a dynamic batch dimension (resnet18, batches 1/16/32, then 5)."""

from __future__ import annotations

import sys
import traceback

import torch
import torchvision

variant = sys.argv[1]
if variant == "worker":
    import tempfile

    from warmserve.cache import CacheConfig
    from warmserve.serve.spec import InputSpec, ModelSpec
    from warmserve.serve.worker import Worker

    spec = ModelSpec(model="torchvision:resnet18", input=InputSpec(shape=(3, 224, 224), min_batch=1, max_batch=32))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            w = Worker(
                spec, backend="inductor", device="cuda", cache_config=CacheConfig.load(environ={}, cache_dir=tmp)
            )
            print("worker", w.start().outcome, flush=True)
    except Exception:
        print("worker FAILED:", traceback.format_exc()[-3000:], flush=True)
    sys.exit(0)
m = torchvision.models.resnet18().cuda().eval()
batches = (1, 16, 32, 5, 5, 5)
if variant == "batches-1-2-32":
    variant, batches = "mark", (1, 2, 32, 5, 5, 5)
if variant == "thread-after-main":
    from concurrent.futures import ThreadPoolExecutor

    compiled = torch.compile(m, mode="reduce-overhead")
    pool = ThreadPoolExecutor(1)
    try:
        for b in (1, 16, 32):
            x = torch.randn(b, 3, 224, 224, device="cuda")
            torch._dynamo.maybe_mark_dynamic(x, 0)
            with torch.inference_mode():
                compiled(x)
        for b in (1, 16, 32, 5):
            x = torch.randn(b, 3, 224, 224, device="cuda")
            pool.submit(lambda x=x: compiled(x)).result()
            print(variant, "batch", b, "ok", flush=True)
    except Exception as e:
        print(variant, "FAILED:", repr(e)[:300], flush=True)
    sys.exit(0)
if variant == "meta-assign":
    from warmserve.serve.model import build_model
    from warmserve.serve.weights import demo_weights

    state = demo_weights(build_model("torchvision:resnet18"), seed=0)
    m = build_model("torchvision:resnet18", meta=True)
    m.load_state_dict(state, assign=True)
    m = m.to("cuda").eval()
if variant == "skip-dynamic":
    torch._inductor.config.triton.cudagraph_skip_dynamic_graphs = True
compiled = torch.compile(m, mode="reduce-overhead")
try:
    for b in batches:
        x = torch.randn(b, 3, 224, 224, device="cuda")
        if variant != "no-mark":
            torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch.inference_mode():
            out = compiled(x)
        torch.cuda.synchronize()
        ref = m(x)
        print(variant, "batch", b, "ok", float((out - ref).abs().max()), flush=True)
except Exception:
    print(variant, "FAILED:", "".join(traceback.format_exc().splitlines(True)[-6:])[-1500:], flush=True)
