"""Why does loading an AOTInductor package crash on this machine? Compile tiny CPU packages under several
settings and load each in a child process (with faulthandler); print what the shared library links to.

    python bench/aoti_probe.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

import torch

LOAD = (
    "import torch, sys; from torch._inductor import aoti_load_package; m = aoti_load_package(sys.argv[1]);"
    "print('load ok', m(torch.randn(2, 8)).shape)"
)
VARIANTS = {
    "default": {},
    "no-vectorisation": {"cpp.vec_isa_ok": False},
    "no-openmp": {"cpp.threads": 1},
    "debug-compile": {"aot_inductor.debug_compile": True},
}


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def main() -> None:
    print("torch", torch.__version__, "cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI, "| ", sh("g++", "--version")[:40])
    print(
        "cpu flags:",
        " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in sh("cat", "/proc/cpuinfo")),
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    ep = torch.export.export(model, (torch.randn(2, 8),))
    for name, cfg in VARIANTS.items():
        tmp = tempfile.mkdtemp()
        try:
            with torch._inductor.config.patch(cfg):
                pkg = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, "m.pt2"))
        except Exception as e:
            print(f"--- {name}: compile failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        with zipfile.ZipFile(pkg) as z:
            so = next(n for n in z.namelist() if n.endswith(".so"))
            z.extractall(tmp)
        dyn = [line.split()[-1] for line in sh("readelf", "-d", os.path.join(tmp, so)).splitlines() if "NEEDED" in line]
        p = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", LOAD, pkg], capture_output=True, text=True, timeout=300
        )
        last = [t for t in (p.stdout + p.stderr).strip().splitlines() if "Warning" not in t][-3:]
        print(f"--- {name}: rc={p.returncode} needed={dyn} :: {' | '.join(last)[:300]}")


if __name__ == "__main__":
    main()
