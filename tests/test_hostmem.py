"""gptjax.hostmem: a large block freed by a worker thread is reused, not faulted in again."""

import os
import subprocess
import sys

import pytest

from gptjax import hostmem

# A worker thread allocates, writes and frees 256 MB three times (as XLA:CPU does with an
# execution's temporary buffer) and reports the minor page faults of the last two rounds.
PROBE = """
import ctypes, resource, threading
from gptjax import hostmem
print(hostmem.keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def work():
    for i in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(256 << 20)
        ctypes.memset(block, 1, 256 << 20)  # every page written
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=work); t.start(); t.join()
print(sum(faults[1:]))
"""


def _probe(keep: bool) -> tuple[str, int]:
    env = dict(os.environ, **{hostmem.ENV_OPT_OUT: "1" if keep else "0"})
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    applied, kept_faults = _probe(keep=True)
    opted_out, default_faults = _probe(keep=False)
    assert opted_out == "False"  # GPTJAX_KEEP_FREED_MEMORY=0 leaves malloc alone
    if applied != "True":
        pytest.skip("not glibc: keep_freed_memory does not apply")
    # 2 x 256 MB is 131072 pages of 4 KiB: the default faults them all in again.
    assert default_faults > 100_000, default_faults
    assert kept_faults < default_faults / 20, (kept_faults, default_faults)


def test_applied_only_where_the_backend_is_the_cpu():
    env = dict(os.environ, **{hostmem.ENV_OPT_OUT: "1", "JAX_PLATFORMS": "tpu"})
    code = "from gptjax import hostmem; print(hostmem.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False"]
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True"]
