"""Run metrics: MFU accounting, metrics.jsonl + TensorBoard + console, the loss plot."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax

from gptjax.files import write_text_atomic


class Device(NamedTuple):
    peak_flops: float  # dense FLOP/s per device in the compute dtype that matters
    hbm_bytes: int  # device memory; 0 where there is no fixed figure


GiB, MiB = 2**30, 2**20

# THE device table: dense bf16 peak FLOP/s (accelerators) and memory per device. Keys
# are matched as substrings of jax's device_kind ("NVIDIA H100 80GB HBM3", "TPU v5p").
# GPU memory as nvidia-smi reports it (the 80GB H100 has 81,559 MiB = 79.6 GiB). A CPU
# has no meaningful per-device figure: simulated CPU devices share the host's cores, so
# the CPU entry is per process (host).
DEVICES = {
    "h100": Device(989e12, 81559 * MiB),  # SXM 80GB
    "h200": Device(989e12, 143771 * MiB),  # 141GB
    "a100": Device(312e12, 81920 * MiB),  # 80GB
    "a100-40gb": Device(312e12, 40960 * MiB),
    "tpu v4": Device(275e12, 32 * GiB),
    "tpu v5p": Device(459e12, 95 * GiB),
    "tpu v5 lite": Device(197e12, 16 * GiB),  # v5e
    "tpu v5e": Device(197e12, 16 * GiB),
    "tpu v6 lite": Device(918e12, 32 * GiB),  # v6e
    "tpu v6e": Device(918e12, 32 * GiB),
    "cpu": Device(150e9, 0),  # JAX f32 matmul on a small x86 host; set train.peak_flops
}
PEAK_FLOPS = {name: d.peak_flops for name, d in DEVICES.items()}


def peak_flops_total(override: float = 0.0) -> float:
    """Peak FLOP/s of all devices of the run (per device x devices; per host on CPU)."""
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    per = override
    if not per:
        matches = [v for k, v in PEAK_FLOPS.items() if k in kind or k in device.platform]
        per = matches[0] if matches else 0.0
    if device.platform == "cpu":
        return per * jax.process_count()
    return per * jax.device_count()


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
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if math.isfinite(float(v)):
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
    out = Path(workdir) / "loss.png"
    tmp = out.with_name("loss.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out
