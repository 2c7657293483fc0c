"""A warm start's weights phase on a GPU, split: read, sha256, parse, opening the device, copy to it.

    python bench/device_open.py CACHE_DIR seq        # the device opened after the weights are read
    python bench/device_open.py CACHE_DIR overlap    # opened on a thread while they are read (what a start does)
    for i in $(seq 10); do python bench/device_open.py CACHE_DIR overlap & done; wait    # a scale-up's ten

CACHE_DIR is an engine cache whose demo weights exist (a `warmserve build` there wrote them). Prints one JSON
line of seconds: ``cuda_init`` is torch's CUDA initialisation, ``first_alloc`` the first allocation (the
context), ``wait`` what the reading thread still waited for both.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    cache_dir, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "overlap"
    t0 = time.perf_counter()
    import torch

    from warmserve.serve.weights import read_weights

    out: dict[str, float | str] = {"mode": mode, "import_torch": time.perf_counter() - t0}
    found = sorted(Path(cache_dir, "weights").glob("**/*.safetensors"))
    if not found:
        sys.exit(f"no demo weights under {cache_dir}/weights: run `warmserve build --cache-dir {cache_dir}` first")
    uri = found[0]
    began = time.perf_counter()

    def open_device() -> None:
        t = time.perf_counter()
        torch.cuda.init()
        out["cuda_init"] = time.perf_counter() - t
        t = time.perf_counter()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        out["first_alloc"] = time.perf_counter() - t

    thread = threading.Thread(target=open_device) if mode == "overlap" else None
    if thread:
        thread.start()
    t = time.perf_counter()
    state = read_weights(str(uri)).state  # read, hashed and parsed, as a start does
    out["read_hash_parse"] = time.perf_counter() - t
    t = time.perf_counter()
    if thread:
        thread.join()
    else:
        open_device()
    out["wait"] = time.perf_counter() - t
    t = time.perf_counter()
    on_device = {k: v.to("cuda") for k, v in state.items()}
    torch.cuda.synchronize()
    del on_device
    out["copy"] = time.perf_counter() - t
    out["total"] = time.perf_counter() - began
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
