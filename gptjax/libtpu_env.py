"""libtpu on a machine without a TPU chip: the `tpu` extra installs it, and jax then
initialises it in every process, even one that only uses the CPU."""

from __future__ import annotations

import glob
import os


def quiet() -> None:
    """Stop libtpu asking GCE's metadata server who it runs on, which on a machine without
    a TPU prints 'could not determine TPU accelerator type / worker hostnames' warnings
    (compiling needs neither). Only where no TPU chip is attached (no /dev/accel*,
    /dev/vfio/N): on a TPU VM the real values stay in charge."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")  # any valid name: unused
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a machine-wide lock for the chips it would drive; compiling drives none,
    # and several processes (a plan beside the tests) may compile at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
