"""The C++ compiler Inductor builds with: chosen by building and loading a tiny library, never assumed.

Inductor takes its compiler from ``$CXX`` (else ``g++``). A compiler can build packages that crash when
loaded: one whose libraries link libstdc++ statically, say, next to the shared one torch already loaded.
``--version`` does not tell, so each candidate (``$CXX``, then the system's ``g++``, ``c++``, ``clang++``)
builds a tiny shared library the way Inductor builds packages and loads it in a child process next to torch;
the first that passes is used and recorded in the cache key. The check runs before the first build on a node
(a warm start from the cache needs no compiler) and its verdict is kept in the cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from warmserve.cache.atomic import atomic_write
from warmserve.serve.errors import BackendUnavailable, ToolchainChanged

logger = logging.getLogger(__name__)

# A tiny C++ library, built as Inductor builds its packages (a shared object with the C++ runtime) and loaded
# in a child process next to torch. It uses what the AOTInductor runtime uses when a package loads (std::regex
# on a device string, exceptions): a compiler whose libraries link libstdc++ statically crashes right there,
# as real packages do. Seconds, where compiling a real tiny package costs a minute on a small machine.
PROBE_SOURCE = r"""
#include <regex>
#include <stdexcept>
#include <string>
extern "C" int warmserve_probe() {
  try {
    std::smatch m;
    std::string device = "cuda:3";
    if (!std::regex_match(device, m, std::regex("(cuda|cpu)(:([0-9]+))?"))) return 1;
    throw std::runtime_error(m[3].str());
  } catch (const std::runtime_error& e) {
    return std::stoi(e.what()) == 3 ? 42 : 2;
  }
}
"""
PROBE_LOAD = "import ctypes, sys, torch; sys.exit(0 if ctypes.CDLL(sys.argv[1]).warmserve_probe() == 42 else 3)"
PROBE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Compiler:
    path: str  # as found on PATH or given in $CXX
    version: str  # first line of `--version`

    @property
    def real(self) -> str:
        return os.path.realpath(self.path)

    def doc(self) -> dict[str, str]:
        """What the cache key records: the executable and the version it reports."""
        return {"path": self.real, "version": self.version}


@dataclass(frozen=True)
class Verdict:
    """The compiler to build with (None: none works here) and why the others were passed over."""

    chosen: Compiler | None
    rejected: Mapping[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": asdict(self.chosen) if self.chosen else None, "rejected": dict(self.rejected), "at": self.at}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Verdict:
        chosen = doc.get("chosen")
        return cls(Compiler(**chosen) if chosen else None, dict(doc.get("rejected") or {}), float(doc.get("at", 0)))


def version_of(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def candidates(environ: Mapping[str, str] | None = None) -> list[str]:
    """Compilers to try, in order: ``$CXX``, then the system's; each executable once."""
    env = os.environ if environ is None else environ
    found, seen = [], set()
    for name in (env.get("CXX"), "g++", "c++", "clang++"):
        path = shutil.which(name) if name else None
        if name and path is None and name == env.get("CXX"):
            logger.warning("CXX=%s is not an executable; trying the system compilers", name)
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            found.append(path)
    return found


def _needed(library: str) -> list[str] | None:
    """The shared libraries an ELF file asks for (readelf), or None where that cannot be read."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    try:
        out = subprocess.run([readelf, "-d", library], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.rsplit("[", 1)[-1].rstrip("]") for line in out.stdout.splitlines() if "(NEEDED)" in line]


def probe(path: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Build a tiny C++ library with the compiler at ``path`` and load it in a child process next to torch:
    None if that works, else what went wrong."""
    with tempfile.TemporaryDirectory(prefix="warmserve-cxx-") as tmp:
        source, library = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        Path(source).write_text(PROBE_SOURCE)
        try:
            built = subprocess.run(
                [path, "-shared", "-fPIC", "-O2", "-std=c++17", source, "-o", library],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return f"could not run it: {e}"
        if built.returncode != 0:
            tail = [line for line in built.stderr.strip().splitlines() if line.strip()][-1:] or [
                f"exit {built.returncode}"
            ]
            return f"building a tiny shared library failed: {tail[0][:300]}"
        needed = _needed(library)
        if needed is not None and not any(name.startswith("libstdc++") for name in needed):
            return (
                "its libraries link libstdc++ statically (the one it built needs no libstdc++.so); AOTInductor "
                "packages built that way crash when loaded next to torch's"
            )
        try:
            loaded = subprocess.run(
                [sys.executable, "-c", PROBE_LOAD, library], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return f"loading the library it built took over {timeout:.0f}s"
    if loaded.returncode == 0:
        return None
    if loaded.returncode < 0:
        return f"the library it built crashed the process that loaded it ({signal.Signals(-loaded.returncode).name})"
    tail = [line for line in loaded.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {loaded.returncode}"]
    return f"the library it built did not run: {tail[0][:300]}"


class Toolchain:
    """The compiler for Inductor's C++ on this node, with a positive verdict kept in ``workdir``. ``keyed()``
    is cheap (no build); ``verified()`` probes if no verdict is kept yet."""

    def __init__(self, workdir: Path, environ: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.paths = candidates(environ)
        self._versions: dict[str, str | None] = {}

    def _version(self, path: str) -> str | None:
        if path not in self._versions:
            self._versions[path] = version_of(path)
        return self._versions[path]

    @property
    def _record(self) -> Path:
        import torch

        stamp = []
        for path in self.paths:
            try:
                st = os.stat(path)
                stamp.append([path, os.path.realpath(path), st.st_size, int(st.st_mtime)])
            except OSError:
                stamp.append([path])
        doc = json.dumps([stamp, torch.__version__], sort_keys=True).encode()
        return self.workdir / "toolchain" / f"{hashlib.sha256(doc).hexdigest()[:24]}.json"

    def kept(self) -> Verdict | None:
        """The verdict a probe on this node already reached for these compilers, if any."""
        try:
            return Verdict.from_dict(json.loads(self._record.read_bytes()))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def keyed(self) -> Compiler | None:
        """The compiler an artifact for this node is keyed by: the verdict's choice, or before any probe the
        first candidate (optimistic: a cache hit then needs no compiler at all). None: none works here."""
        verdict = self.kept()
        if verdict is not None:
            return verdict.chosen
        for path in self.paths:
            version = self._version(path)
            if version:
                return Compiler(path, version)
        return None

    def verified(self) -> Verdict:
        """Probe the candidates in order (once per node) and keep the verdict."""
        verdict = self.kept()
        if verdict is not None:
            return verdict
        rejected: dict[str, str] = {}
        chosen = None
        for path in self.paths:
            version = self._version(path)
            if not version:
                rejected[path] = "`--version` failed"
                continue
            logger.info("checking the C++ compiler %s (%s): building and loading a tiny library", path, version)
            problem = probe(path)
            if problem is None:
                chosen = Compiler(path, version)
                break
            logger.warning("C++ compiler %s rejected: %s", path, problem)
            rejected[path] = problem
        verdict = Verdict(chosen, rejected)
        if chosen is not None:  # only a positive verdict is kept: a failure may pass later (a full disk, say)
            atomic_write(self._record, json.dumps(verdict.to_dict(), indent=1).encode())
        return verdict

    def require(self) -> Compiler:
        """The verified compiler, or ``BackendUnavailable`` naming every candidate and why it failed."""
        verdict = self.verified()
        if verdict.chosen is None:
            tried = "; ".join(f"{p}: {why}" for p, why in verdict.rejected.items()) or "no C++ compiler on PATH"
            raise BackendUnavailable(
                f"Inductor's C++ needs a compiler whose libraries load next to torch here, and none does ({tried}); "
                "install g++ (or set CXX to one), or choose --backend inductor"
            )
        return verdict.chosen


class CompilerPin:
    """For a backend that compiles C++: the compiler its artifacts are keyed by, and built with."""

    def __init__(self, workdir: Path) -> None:
        self.toolchain = Toolchain(workdir)
        self._keyed: Compiler | None = None

    def key_doc(self) -> dict[str, str]:
        """The compiler for the cache key (no build happens here; see ``Toolchain.keyed``)."""
        self._keyed = self.toolchain.keyed()
        if self._keyed is None:
            self.toolchain.require()  # raises, naming every candidate and why it failed
            raise AssertionError("unreachable: require() raises when no compiler works")  # pragma: no cover
        return self._keyed.doc()

    @contextlib.contextmanager
    def building(self, prove: bool = True) -> Iterator[Compiler]:
        """Inductor compiles with the proven compiler inside this block; ``ToolchainChanged`` if that is
        not the one the key named (the caller computes the key again). ``prove=False`` (loading an
        artifact, where nothing should compile) uses the keyed compiler without a probe."""
        compiler = self.toolchain.require() if prove or self._keyed is None else self._keyed
        if compiler != self._keyed:
            raise ToolchainChanged(f"the C++ compiler is {compiler.path} ({compiler.version}), not {self._keyed}")
        import torch._inductor.config

        with torch._inductor.config.patch({"cpp.cxx": (None, compiler.path)}):
            yield compiler

    def report(self) -> dict[str, Any]:
        verdict = self.toolchain.kept()
        chosen = verdict.chosen if verdict else self._keyed
        return {
            "cxx": chosen.path if chosen else None,
            "cxx_version": chosen.version if chosen else None,
            "cxx_checked": verdict is not None,
            "cxx_rejected": dict(verdict.rejected) if verdict else {},
        }
