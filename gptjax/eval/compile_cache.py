"""JAX's persistent compilation cache for evaluation, in the user's cache directory."""

from __future__ import annotations

from pathlib import Path

import jax


def compile_cache_dir(environ=None) -> Path:
    """Where evaluation keeps JAX's persistent compilation cache by default: the user's
    cache directory ($XDG_CACHE_HOME, else ~/.cache), gptjax/jax."""
    import os

    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or Path(environ.get("HOME", "~")) / ".cache"
    return Path(base).expanduser() / "gptjax" / "jax"


def use_compile_cache(directory: Path | None) -> str | None:
    """Turn JAX's persistent compilation cache on in `directory` unless one is already
    configured (JAX_COMPILATION_CACHE_DIR, a caller's jax.config); None turns nothing on.
    A user evaluates a checkpoint once, in a fresh process, so a scoring program's
    compile (seconds each, a handful per task) is otherwise paid on every run. Returns
    the cache directory in use."""
    if jax.config.jax_compilation_cache_dir or directory is None:
        return jax.config.jax_compilation_cache_dir or None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return str(directory)
