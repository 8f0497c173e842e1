"""Run metrics: MFU accounting, metrics.jsonl + TensorBoard + console, the loss and eval
plots."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.files import save_figure, write_text_atomic


class Device(NamedTuple):
    peak_flops: float  # dense FLOP/s per device in the compute dtype that matters
    hbm_bytes: int  # device memory; 0 where there is no fixed figure


GiB, MiB = 2**30, 2**20

# THE device table, keyed by the exact `device_kind` strings jax reports (libtpu's
# topologies report the same ones): dense bf16 peak FLOP/s and memory per device. A v4
# or v5p device is one chip (megacore: both TensorCores). GPU memory as nvidia-smi
# reports it (the 80GB H100 has 81,559 MiB = 79.6 GiB).
DEVICES = {
    "TPU v4": Device(275e12, 32 * GiB),
    "TPU v5 lite": Device(197e12, 16 * GiB),  # v5e
    "TPU v5": Device(459e12, 95 * GiB),  # v5p
    "TPU v6 lite": Device(918e12, 32 * GiB),  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": Device(989e12, 81559 * MiB),  # SXM
    "NVIDIA H100 PCIe": Device(756e12, 81559 * MiB),
    "NVIDIA H200": Device(989e12, 143771 * MiB),
    "NVIDIA A100-SXM4-80GB": Device(312e12, 81920 * MiB),
    "NVIDIA A100-SXM4-40GB": Device(312e12, 40960 * MiB),
    "NVIDIA A100 80GB PCIe": Device(312e12, 81920 * MiB),
}
# Short names for `gptjax plan --device` and the docs -> device_kind.
ALIASES = {
    "h100": "NVIDIA H100 80GB HBM3",
    "h200": "NVIDIA H200",
    "a100": "NVIDIA A100-SXM4-80GB",
    "a100-40gb": "NVIDIA A100-SXM4-40GB",
    "v4": "TPU v4",
    "v5e": "TPU v5 lite",
    "v5p": "TPU v5",
    "v6e": "TPU v6 lite",
}

log = logging.getLogger(__name__)
_warned: set[str] = set()


def device_info(kind: str) -> Device | None:
    """The table's entry for a device_kind (or an alias), None for one it lacks."""
    return DEVICES.get(ALIASES.get(kind.lower().strip(), kind))


@functools.cache
def cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """This host's measured f32 matmul FLOP/s (the best of a few n x n matmuls on one
    CPU device of this process, all its threads): the CPU's MFU peak, probed once per
    process (on a device of its own: another process's cannot take its arrays)."""
    device = jax.local_devices(backend="cpu")[0]
    best = math.inf
    # On one device whatever mesh the caller (the trainer) has set.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("probe",))):
        a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_total(override: float = 0.0) -> float | None:
    """Peak FLOP/s of all devices of the run (per device x devices; per host on CPU), or
    None for a device kind the table lacks (warned once: its MFU is logged as null).
    override: train.peak_flops, per device (per host on CPU)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return (override or cpu_peak_flops()) * jax.process_count()
    per = override or peak_for_kind(device.device_kind)
    return per * jax.device_count() if per else None


def peak_for_kind(kind: str) -> float | None:
    """The table's peak FLOP/s of a device_kind; None (warned once per kind) if unknown."""
    d = device_info(kind)
    if d is None and kind not in _warned:
        _warned.add(kind)
        log.warning(
            "no peak FLOP/s for device_kind %r (gptjax.metrics.DEVICES): MFU is logged as "
            "null; set train.peak_flops",
            kind,
        )
    return None if d is None else d.peak_flops


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization, None without a peak. Capped at 1: above it the peak was
    too low (a CPU probe slower than the run's own matmuls), not the run faster."""
    if not peak:
        return None
    return min(tokens_per_sec * flops_per_token / peak, 1.0)


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl and mirrors scalars
    to TensorBoard. Only process 0 writes."""

    def __init__(self, workdir: Path, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines."""
        if not self.path.exists():
            return
        kept = [r for r in _records(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        # None (an MFU without a known peak) is written as null, never as a number.
        record = {"step": step, **{k: None if v is None else float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.tb.add_scalar(k, float(v), step)
        self.tb.flush()

    def write_partial(self, step: int, losses: list[float]) -> None:
        """The losses of a window cut short (SIGTERM), marked partial, so that the
        resumed run completes the window (see partial_window)."""
        if not self.enabled or not losses:
            return
        record = {"step": step, "partial": True, "loss": sum(losses) / len(losses),
                  "window_losses": [float(x) for x in losses]}  # fmt: skip
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def partial_window(self, step: int) -> list[float]:
        """The losses of the window cut short at `step` (the resumed-from step), or []."""
        if not self.path.exists():
            return []
        last = (_records(self.path) or [{}])[-1]
        return last.get("window_losses", []) if last.get("step") == step else []

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _records(path: Path) -> list[dict]:
    """The JSON lines of a metrics file. A line that does not parse is the one a killed
    run was writing (it is the last): skipped, so the run still resumes."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if line.strip():
                logging.getLogger(__name__).warning("%s: skipped a torn line %r", path, line)
    return records


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return _records(path) if path.exists() else []


def plot_loss(workdir: Path) -> Path | None:
    """WORKDIR/loss.png: training loss and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, Path(workdir) / "loss.png", dpi=100, bbox_inches="tight")


def plot_eval(workdir: Path) -> Path | None:
    """WORKDIR/eval.png, beside loss.png: each few-shot metric (eval/TASK/METRIC, from
    train.eval_tasks) against step, one panel per task; None when there are none."""
    records = read_metrics(workdir)
    series: dict[str, dict[str, list]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("eval/") and value is not None:
                _, task, metric = key.split("/", 2)
                series.setdefault(task, {}).setdefault(metric, []).append((r["step"], value))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(series), figsize=(5 * len(series), 3.6), squeeze=False, sharex=True
    )
    for ax, (task, by_metric) in zip(axes[0], sorted(series.items()), strict=True):
        for metric, points in sorted(by_metric.items()):
            ax.plot(*zip(*points, strict=True), "o-", label=metric)
        if any(v > 1 for points in by_metric.values() for _, v in points):
            ax.set_yscale("log")  # perplexities beside bits per byte
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, Path(workdir) / "eval.png", dpi=100, bbox_inches="tight")
