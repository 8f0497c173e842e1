"""Output files written whole or not at all, and JSON that stays strict."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it: a reader (or a run
    interrupted mid-write) sees the old file or the new one, never a part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_figure(fig, path: str | Path, **savefig_kw) -> Path:
    """A matplotlib figure written as write_text_atomic writes text (a temporary name
    beside `path`, then a rename), in the format of path's suffix; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kw)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path


def json_safe(obj):
    """`obj` with every NaN or infinite float replaced by None (JSON null), e.g. a
    standard error of a single sample, so json.dumps writes strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
