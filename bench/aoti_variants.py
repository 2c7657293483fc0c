"""AOTInductor settings that might make the served engine faster on a GPU, each measured as warmserve serves it.

    python bench/aoti_variants.py [--model torchvision:resnet18] [--out DIR]

Each variant is compiled, loaded, refitted with new weights, its CUDA graphs recorded (warmserve's own
AOTIBackend), checked against eager, and timed at batch 1 and 32 in interleaved rounds next to eager in this
process; cuDNN's autotuner (``torch.backends.cudnn.benchmark``) off and on, for both. Writes aoti-variants.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_device import latency_rounds

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "freezing": {"freezing": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="torchvision:resnet18")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()

    from warmserve.serve.backends import aoti
    from warmserve.serve.model import build_model
    from warmserve.serve.spec import InputSpec
    from warmserve.serve.weights import demo_weights

    device = torch.device("cuda")
    spec = InputSpec(shape=(3, 224, 224), min_batch=1, max_batch=32)
    model = build_model(args.model).to(device).eval()
    new = {k: v.to(device) for k, v in demo_weights(build_model(args.model, meta=True), seed=11).items()}
    eager = build_model(args.model).to(device).eval()
    eager.load_state_dict(new)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            row: dict[str, Any] = {"variant": name, "configs": VARIANTS[name]}
            saved = dict(aoti.INDUCTOR_CONFIGS)
            aoti.INDUCTOR_CONFIGS.update(VARIANTS[name])
            try:
                backend = aoti.AOTIBackend(device, workdir=Path(tmp))
                backend.cxx.toolchain.verified()  # prove the compiler once, so the key names the one that builds
                backend.settings()
                t0 = time.perf_counter()
                artifact = backend.compile(model, spec)
                row["compile_s"] = time.perf_counter() - t0
                loaded = backend.load(artifact, model, spec)
                loaded.refit(new)

                def engine(x: torch.Tensor, e: Any = loaded) -> torch.Tensor:  # engines take and return lists
                    return e([x])[0]

                t0 = time.perf_counter()
                loaded.prepare()
                row["prepare_s"] = time.perf_counter() - t0
                for bench in (False, True):
                    torch.backends.cudnn.benchmark = bench
                    for b in (1, 32):
                        x = spec.example(batch=b, device=device)
                        times = latency_rounds({"compiled": engine, "eager": eager}, x)
                        with torch.inference_mode():
                            err = float((engine(x) - eager(x)).abs().max() / eager(x).abs().max())
                        row[f"b{b}{'_cudnn_benchmark' if bench else ''}"] = {
                            **times,
                            "speedup": times["eager"]["median"] / times["compiled"]["median"],
                            "rel_err": err,
                        }
                torch.backends.cudnn.benchmark = False
            except Exception as e:  # a variant that fails is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            finally:
                aoti.INDUCTOR_CONFIGS.clear()
                aoti.INDUCTOR_CONFIGS.update(saved)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    lines = [
        f"# AOTInductor variants - {time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        "ms per call through warmserve's engine (CUDA graphs), median (min-max) of 7 interleaved rounds; eager in the same process.",
        "",
        "| variant | cudnn.benchmark | b1 ms | b1 eager | b1 x | b32 ms | b32 eager | b32 x | rel err after refit | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | | failed: {row['error'][:150]} | | | | | | | |")
            continue
        for suffix, label in (("", "off"), ("_cudnn_benchmark", "on")):
            b1, b32 = row[f"b1{suffix}"], row[f"b32{suffix}"]

            def ms(t: dict[str, float]) -> str:
                return f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})"

            lines.append(
                f"| {row['variant']} | {label} | {ms(b1['compiled'])} | {ms(b1['eager'])} | {b1['speedup']:.2f} | "
                f"{ms(b32['compiled'])} | {ms(b32['eager'])} | {b32['speedup']:.2f} | "
                f"{max(b1['rel_err'], b32['rel_err']):.1e} | {row['compile_s']:.0f} |"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aoti-variants.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "aoti-variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
