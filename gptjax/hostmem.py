"""Host memory allocator settings for CPU runs.

XLA:CPU allocates each execution's temporary buffer with malloc on one of its worker
threads and frees it at the end: for the 6 x 384 train bench step that is one 785 MB
block per step. glibc serves a request that large from a fresh mmap whenever it comes
from a thread's arena, and unmaps it on free, so every step page-faults its whole
temporary buffer in again (~190k minor faults, a fifth of the step). One malloc arena,
no mmap for large blocks and a high trim threshold keep the freed block in the process
for the next step instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of freed memory
ENV_OPT_OUT = "GPTJAX_KEEP_FREED_MEMORY"  # "0": leave malloc as it is


def keep_freed_memory() -> bool:
    """Configure glibc malloc to keep freed memory for reuse; True if it was applied.

    Call it at process start, before JAX starts its thread pools (threads pick their
    malloc arena on first use). A no-op off Linux/glibc, or with GPTJAX_KEEP_FREED_MEMORY=0.
    Process-wide: it applies to every library in the process alike. Only where jax's
    backend will be the CPU (cpu_backend()): a TPU/GPU host keeps its allocator as is.
    """
    if os.environ.get(ENV_OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not cpu_backend():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: these are its parameters
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not ok:
        log.warning("mallopt refused a setting; malloc keeps its defaults where it did")
    return ok


def cpu_backend() -> bool:
    """Whether jax's default backend will be the CPU, decided before jax starts (asking
    jax would start its threads): JAX_PLATFORMS if set, else whether a TPU or GPU device
    node exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    accelerators = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")
    return not any(glob.glob(pattern) for pattern in accelerators)
