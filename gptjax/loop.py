"""The pieces the pretraining and fine-tuning loops share, as plain functions and two
small context objects: preemption, the progress bar, draining queued step metrics with
the NaN check, and the checkpoint cadence. Each loop stays a readable for-loop."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable

import jax


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


class PreemptionFlag:
    """Turns SIGTERM (preemption) into a flag the loop checks after each step.

    With several processes, SIGTERM may reach them at different steps (or reach only
    some): JAX's preemption service catches it instead and agrees on one step at which
    every process stops, so they all save the same checkpoint.
    """

    def __init__(self):
        self.raised = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def reached(self, step: int) -> bool:
        """Called by every process after every step: stop and save at this step?"""
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.raised

    def __enter__(self):
        if self._multi:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no preemption handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Progress:
    """A tqdm bar over steps, showing the latest logged metrics (process 0 only)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        shown = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_sec']:.0f}"}
        if "val_loss" in record:
            shown["val"] = f"{record['val_loss']:.3f}"
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def drain(pending: list, message: Callable[[int, float], str]) -> list:
    """Read the queued (step, device metrics) pairs and empty `pending`. NonFiniteLoss,
    with message(step, loss), at the first step whose loss is not finite."""
    got = jax.device_get(pending)
    pending.clear()
    _check_finite(got, message)
    return got


def check_finite(pending: list, message: Callable[[int, float], str]) -> None:
    """drain's NaN check, leaving `pending` queued for the next log record: before a
    checkpoint, so that no checkpoint holds a state whose loss went NaN/inf."""
    _check_finite(jax.device_get(pending), message)


def _check_finite(got: list, message: Callable[[int, float], str]) -> None:
    for step, m in got:
        if not math.isfinite(float(m["loss"])):
            raise NonFiniteLoss(message(step, float(m["loss"])))


def checkpoint_due(step: int, every_steps: int, *, last: bool) -> bool:
    """The cadence: every `every_steps` steps and at the last step (of a run or epoch)."""
    return step % every_steps == 0 or last


def stop_if_preempted(
    flag: PreemptionFlag, step: int, *, saved: bool, save, ckpt, why: str, stop_after=None,
    on_stop: Callable[[int], None] | None = None,
) -> None:  # fmt: skip
    """After each step: when preempted (or at `stop_after`), save unless this step was
    saved already, call on_stop(step), wait for the write, and raise
    Preempted('{why} at step N: ...')."""
    if flag.reached(step) or step == stop_after:
        if not saved:
            save(step)
        if on_stop is not None:
            on_stop(step)
        ckpt.wait()
        raise Preempted(f"{why} at step {step}: checkpoint saved; re-run to resume")
