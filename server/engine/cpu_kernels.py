"""Hand-written CPU kernels (csrc/), built on first use and registered as torch operators.

`decode_attention` is the paged attention of one decode token per row (see
csrc/decode_attention.cpp): batched decode graphs call it on the CPU, where inductor's own code
for the same gather-and-reduce costs ~2x more per past position (bench/RESULTS.md).

The library is compiled with the C++ compiler torch.compile already needs, for the vector ISA
inductor picks on this CPU (AVX-512, AVX2, or none), and cached under `$PARCAE_KERNEL_CACHE`
(default `~/.cache/parcae-serve/kernels`), keyed by the source, the compiler command and
version, and torch's build. Where it cannot be built or loaded, callers keep their pure-torch
path; `available()` says which.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
import torch.utils.cpp_extension
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
CXX_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"]
BUILD_TIMEOUT_S = 300  # a compile takes ~8 s; a hung compiler must not hold the server's start


def cache_dir() -> Path:
    """Where built libraries are kept: $PARCAE_KERNEL_CACHE, else ~/.cache/parcae-serve/kernels."""
    default = Path.home() / ".cache" / "parcae-serve" / "kernels"
    return Path(os.environ.get("PARCAE_KERNEL_CACHE", default))


def _isa_flags() -> list[str]:
    """Compiler flags for the vector ISA inductor uses here: at::vec's wide `Vectorized` is
    compiled in only under its CPU_CAPABILITY macro (without it, a scalar array: 2x slower)."""
    from torch._inductor import cpu_vec_isa  # imports dynamo (~2 s): only when building

    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        return []
    return [*(f"-D{m}" for m in isa.build_macro()), *isa.build_arch_flags().split()]


def _compiler() -> list[str]:
    """$CXX as a command (it may hold a wrapper: "ccache g++"), else g++."""
    return shlex.split(os.environ.get("CXX", "g++"))


def _command(source: Path, target: Path) -> list[str]:
    """The compile command; the libraries come after the source, or a linker with --as-needed
    drops them."""
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()]
    lib = Path(torch.__file__).parent / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [*_compiler(), *CXX_FLAGS, *_isa_flags(), abi, *includes, str(source), "-o", str(target),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]  # fmt: skip


def _cpu_features() -> str:
    """The processor's feature flags (Linux), which with torch's build decide the vector ISA;
    read instead of asking inductor, whose import takes ~2 s of every server's start."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    return platform.machine() + platform.processor()


def _library_path() -> Path:
    """The cached library for this source, compiler (command and version), processor and
    torch build (and where it lies: the library links against it). Raises OSError /
    SubprocessError when the compiler cannot be run."""
    command = [*_compiler(), *CXX_FLAGS, str(Path(torch.__file__).parent)]
    version = subprocess.run([*_compiler(), "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout  # fmt: skip
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(command), version, _cpu_features(),
                 torch.__version__, str(torch.version.git_version), sys.platform):  # fmt: skip
        key.update(part.encode() if isinstance(part, str) else part)
    return cache_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    """Compile SOURCE to `target`. Concurrent builders (replicas, test workers) wait on a file
    lock and the first one's result; the library is written beside the target and renamed, so
    no process loads a half-written file. Raises RuntimeError when compiling fails, OSError /
    SubprocessError when the compiler or the cache directory cannot be used."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            result = subprocess.run(_command(SOURCE, partial), capture_output=True, text=True,
                                    timeout=BUILD_TIMEOUT_S)  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(f"building {SOURCE.name} failed:\n{result.stderr[-2000:]}")
            os.replace(partial, target)


_LOCK = threading.Lock()


def available() -> bool:
    """Whether `torch.ops.parcae.decode_attention` is loaded (building it if needed); False,
    with a warning, where it cannot be built or loaded (no compiler, another platform), or
    when PARCAE_CPU_KERNELS=0. Thread-safe; decided once per process."""
    with _LOCK:
        return _load()


@functools.cache
def _load() -> bool:
    if os.environ.get("PARCAE_CPU_KERNELS", "1") == "0":
        return False
    try:
        path = _library_path()
        for attempt in range(2):
            if not path.exists():
                log.info("building the CPU decode-attention kernel (once): %s", path)
                _build(path)
            try:
                torch.ops.load_library(str(path))
                break
            except OSError:  # a damaged cache entry: build it again, once
                if attempt:
                    raise
                path.unlink(missing_ok=True)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("CPU decode-attention kernel unavailable, using the torch path: %s", err)
        return False
    _register_fake()
    return True


def _register_fake() -> None:
    @torch.library.register_fake("parcae::decode_attention")
    def _(q: Tensor, *_: object) -> Tensor:  # the output's shape, for the compiler
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    pool_k: Tensor,
    pool_v: Tensor,
    rows: Tensor,
    lengths: Tensor,
    scale: float,
) -> Tensor:
    """softmax(q k^T * scale) v for one token per row on the CPU, computed in fp32.

    q: (B, H, D); k_self, v_self: (B, Hkv, D) the row's own K/V; pool_k, pool_v: (R, Hkv, D)
    one layer's paged pool, contiguous, fp32, fp16, bf16 or fp8 e4m3 (k_self and v_self in the same
    dtype; q fp32); rows: (B, L) long, the pool rows of each row's past
    positions, of which the first `lengths[b]` are real (the rest are ignored). H must be a
    multiple of Hkv (query heads h*G..h*G+G-1 share K/V head h). Returns (B, H, D) fp32.
    Raises RuntimeError on a shape, dtype or device mismatch or a row outside the pool."""
    return torch.ops.parcae.decode_attention(
        q, k_self, v_self, pool_k, pool_v, rows, lengths, scale
    )
