"""Multi-process JAX: jax.distributed from the config, the environment or the cluster.

One process per host (TPU VM workers, GPU nodes) or per GPU; process 0 also runs the
coordination service. `initialize` must run before anything starts a JAX backend
(jax.devices(), any array), so the CLI calls it first, right after reading the config.

Where each setting comes from, first found wins: the `distributed` config section,
then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID / JAX_LOCAL_DEVICE_IDS,
then JAX's own detection of Cloud TPU, SLURM and Open MPI. With none of them the run is
a single process and nothing is initialised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import NoReturn

import jax

from gptjax.config import ConfigError, DistributedConfig

log = logging.getLogger(__name__)

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}


def explicit_args(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> dict:
    """The coordinates given by the config or the environment (unset ones left out)."""
    given = {
        "coordinator_address": cfg.coordinator_address or None,
        "num_processes": cfg.num_processes or None,
        "process_id": cfg.process_id if cfg.process_id >= 0 else None,
        "local_device_ids": list(cfg.local_device_ids) or None,
    }
    for key, var in ENV.items():
        text = environ.get(var, "").strip()
        if given[key] is not None or not text:
            continue
        try:
            if key == "coordinator_address":
                given[key] = text
            elif key == "local_device_ids":
                given[key] = [int(t) for t in text.split(",") if t.strip()]
            else:
                given[key] = int(text)
        except ValueError:
            raise ConfigError(f"{var}={text!r} is not a valid {key}") from None
    return {k: v for k, v in given.items() if v is not None}


def initialize(cfg: DistributedConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """Start jax.distributed if this run is one of several processes; True if it did.

    initialize="auto": with explicit coordinates (see the module docstring), or else on a
    cluster JAX recognises; a lone SLURM task stays single-process (JAX would otherwise
    restrict it to one GPU). "yes": always, failing when the coordinates are incomplete.
    "no": never. Processes other than 0 then log warnings and errors only.
    """
    if cfg.initialize == "no" or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    args = explicit_args(cfg, environ)
    # local_device_ids alone says which devices, not that there are other processes.
    detect = not {"coordinator_address", "num_processes", "process_id"} & set(args)
    if cfg.initialize == "auto" and detect and environ.get("SLURM_NTASKS", "") == "1":
        return False
    # CPU devices of several processes talk through gloo (already JAX's default; an
    # explicit JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi is kept). Harmless on GPU/TPU.
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            **args,
            initialization_timeout=cfg.initialization_timeout,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
            shutdown_timeout_seconds=cfg.shutdown_timeout,
        )
    except RuntimeError as e:
        # Called in a process that already uses JAX (a test calling cli.main, a notebook):
        # too late to join other processes; with no coordinates given, run alone.
        if cfg.initialize == "auto" and detect and "must be called before" in str(e):
            log.debug("not initialising jax.distributed: %s", e)
            return False
        raise ConfigError(f"jax.distributed.initialize failed: {e}") from e
    except ValueError as e:
        # JAX found neither given coordinates nor a cluster: a single-process run.
        if cfg.initialize == "auto" and detect and "coordinator_address" in str(e):
            return False
        raise ConfigError(
            f"jax.distributed.initialize failed ({e}); set distributed.coordinator_address, "
            "num_processes and process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
            "JAX_PROCESS_ID)"
        ) from e
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # only process 0 logs progress
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
    """Process 0 runs the block first (say, building a cache on a shared filesystem),
    then the other processes run it (finding the cache). A no-op with one process."""
    if jax.process_count() == 1:
        yield
        return
    from jax.experimental import multihost_utils

    if jax.process_index() != 0:
        multihost_utils.sync_global_devices(name)
    yield
    if jax.process_index() == 0:
        multihost_utils.sync_global_devices(name)


def is_multiprocess() -> bool:
    return jax.distributed.is_initialized() and jax.process_count() > 1


def leave(status: int) -> int:
    """`status` for a single process; with several, exit now with it (see exit_now)."""
    if not is_multiprocess():
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def exit_now(error: BaseException, status: int = 1) -> NoReturn:
    """Report this process's failure and leave at once.

    A normal exit would wait in jax.distributed's shutdown barrier for the other
    processes, which may be blocked in a collective with this one or dead: up to
    shutdown_timeout seconds for nothing. Leaving closes this process's connections, so
    the others' collectives fail at once and they leave the same way; a process waiting
    elsewhere is stopped by the coordination service within heartbeat_timeout.
    """
    hint = ""
    if isinstance(error, jax.errors.JaxRuntimeError):
        # Another process's death, seen from here: its traceback would only bury the
        # dead process's own report. The runtime's first line says which collective.
        first = (str(error).strip().splitlines() or [""])[0][:160]
        hint = f" (a collective failed: another process has probably died; see its output: {first})"
    else:  # this process's own failure: the traceback is the report
        traceback.print_exception(error)
    print(
        f"gptjax: process {jax.process_index()} of {jax.process_count()} failed: "
        f"{type(error).__name__}{hint}; exiting without waiting for the other processes",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(status)
