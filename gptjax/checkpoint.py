"""Orbax checkpoints: train state + data iterator position + config + tokenizer.

Layout: WORKDIR/checkpoints/<step>/{state,data,config,tokenizer}. Orbax writes
each step into a temporary directory and renames it when complete, so a run
killed mid-save never leaves a step that looks finished. A step that is present
but unreadable (a damaged disk, a truncated copy) is skipped with a warning and
the previous one restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from gptjax.config import CheckpointConfig

log = logging.getLogger(__name__)

# Arrays are stored in chunks of at most this many bytes. A reader decodes whole chunks,
# so one chunk per array (Orbax's default for an unsharded array) would make every
# process of a sharded restore read and decompress each whole array, at GPT-3 size
# more than one host holds; small chunks keep a restore's transient memory to a few.
CHUNK_BYTES = 16 * 2**20


def chunked(tree):
    """Orbax SaveArgs for `tree` that store it in chunks of at most CHUNK_BYTES."""
    return jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with the current config."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a lost mount): the run stops;
    the steps saved before are intact."""


def checkpoint_dir(workdir: Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


class _WriteFailureEchoes(logging.Filter):
    """A failed background save is logged by each of Orbax's threads and each of its
    asyncio futures (tracebacks by the hundred on a full disk); the CheckpointWriteError
    that the run stops with says it once."""

    ECHOES = ("No space left on device", "RESOURCE_EXHAUSTED", "Event loop is closed")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not any(echo in text for echo in self.ECHOES)


class Checkpointer:
    """The run's CheckpointManager, with restore-with-fallback and metadata reads."""

    def __init__(self, directory: Path, cfg: CheckpointConfig | None = None):
        cfg = cfg or CheckpointConfig()
        self.directory = Path(directory).absolute()
        self._saving: int | None = None  # the step of the last save started
        self._failed = False  # a CheckpointWriteError was raised
        self._unchecked = False  # a save started whose outcome check_saved has not seen
        self._echoes = _WriteFailureEchoes()
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self._echoes)
        self._excepthook, self._unraisablehook = sys.excepthook, sys.unraisablehook
        sys.excepthook, sys.unraisablehook = self._quiet_excepthook, self._quiet_unraisablehook
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True
        )
        # Handlers named up front, so a fresh manager (a resumed run) can read metadata.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "tokenizer": ocp.JsonCheckpointHandler(),
            # The data position is one JSON record, the same on every process (written
            # by process 0), so a run resumes on any number of processes.
            "data": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config: dict, tokenizer: dict) -> None:
        """Start saving `step` (in the background with async_save: see check_saved)."""
        items = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.JsonSave(tokenizer),
        )
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(data_iterator.get_state())
        with self._writing():  # the previous save, which Orbax would wait for anyway
            self.manager.wait_until_finished()
        self._saving = step
        with self._writing():
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._unchecked = True

    def check_saved(self) -> None:
        """Raise CheckpointWriteError if the last background save has failed. Cheap
        enough for every step boundary: a flag read, and once the save has ended, one
        look at its outcome (Orbax's check_for_errors would wait for a running save)."""
        if self._unchecked and not self.manager.is_saving_in_progress():
            self._unchecked = False
            with self._writing():
                self.manager.check_for_errors()

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except Exception as e:
            raise self._write_error(e) from None

    def _write_error(self, error: BaseException) -> CheckpointWriteError:
        """One line: the step, the directory, why, the free space and the step to resume."""
        self._failed = True
        text = str(error)
        reason = f"{type(error).__name__}: " + (text.strip().splitlines() or [""])[0][:200]
        if "No space left on device" in text or "os_error_code='28'" in text:
            reason = "no space left on device"
        try:
            free = f"{shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        step = self._saving
        done = [s for s in self.steps() if s != step]
        last = f"step {done[-1]}" if done else "none"
        return CheckpointWriteError(
            f"checkpoint step {step} could not be written to {self.directory}: {reason} "
            f"({free}); the last complete checkpoint is {last}"
        )

    def read_json(self, step: int) -> tuple[dict, dict]:
        """(config dict, tokenizer record) saved with a step."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()
            ),
        )
        return out["config"], out["tokenizer"]

    def read_latest_json(self) -> tuple[int, dict, dict]:
        """(step, config dict, tokenizer record) of the newest step whose JSON items
        read; a damaged newer step is skipped with a warning (restore sets it aside)."""
        errors = []
        for step in self.steps()[::-1]:
            try:
                return (step, *self.read_json(step))
            except Exception as e:  # a torn or truncated step: try the one before
                errors.append(f"step {step}: {e}")
                log.warning("checkpoint step %d is unreadable (%s); trying an older one", step, e)
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))

    def check_shapes(self, step: int, abstract_state, model_config: dict | None = None) -> None:
        """Fail clearly when the stored parameters do not have the config's shapes,
        naming the model fields that differ when the caller gives its model config."""
        stored = self.manager.item_metadata(step)["state"]
        stored_params = stored.tree["params"]
        diffs = shape_diffs(abstract_state.params, stored_params)
        if diffs:
            fields = ""
            if model_config is not None:
                stored_model = self.read_json(step)[0].get("model", {})
                fields = "; ".join(
                    f"model.{k}: checkpoint {stored_model.get(k)} vs config {v}"
                    for k, v in model_config.items()
                    if k in stored_model and stored_model[k] != v
                )
                fields = f" ({fields})" if fields else ""
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} holds a model of another shape "
                f"than the config{fields}: {diffs}"
            )

    def restore(
        self, abstract_state, data_iterator=None, step: int | None = None, model_config=None
    ):
        """Restore the newest readable step (or `step`) onto abstract_state's shardings.

        Returns (step, state, config dict, tokenizer record); data_iterator is
        restored in place. A step that fails to read falls back to the one before,
        with a warning; a shape mismatch is an error, not a fallback.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for s in candidates:
            try:
                self.check_shapes(s, abstract_state, model_config)
            except CheckpointError:
                raise
            except Exception as e:  # unreadable metadata: treat as a damaged step
                errors.append((s, e))
                log.warning("checkpoint step %d is unreadable (%s); trying an older one", s, e)
                continue
            items = dict(
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
                tokenizer=ocp.args.JsonRestore(),
            )
            if data_iterator is not None:
                items["data"] = ocp.args.JsonRestore()
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:
                errors.append((s, e))
                log.warning("checkpoint step %d is unreadable (%s); trying an older one", s, e)
                continue
            if errors:
                self._set_aside([e[0] for e in errors])
                log.warning(
                    "restored step %d after skipping damaged steps %s", s, [e[0] for e in errors]
                )
            if data_iterator is not None:
                try:
                    data_iterator.set_state(out["data"])
                except ValueError as e:
                    raise CheckpointError(f"checkpoint {self.directory / str(s)}: {e}") from None
            return s, out["state"], out["config"], out["tokenizer"]
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {e}" for s, e in errors)
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged steps to checkpoints_damaged/ (kept for inspection, never deleted)
        so the resumed run can save those step numbers again."""
        if jax.process_index() == 0:
            aside = self.directory.parent / f"{self.directory.name}_damaged"
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                n = 0
                while target.exists():
                    n += 1
                    target = aside / f"{step}.{n}"
                (self.directory / str(step)).rename(target)
                log.warning("moved damaged checkpoint step %d to %s", step, target)
        # Every process reloads only once process 0 has moved the steps.
        ocp.multihost.sync_global_processes(f"gptjax_set_aside_{'_'.join(map(str, steps))}")
        self.manager.reload()

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:
            if not self._failed:
                raise  # after a CheckpointWriteError the same failure, reported already
        finally:
            for name in ("absl", "asyncio"):
                logging.getLogger(name).removeFilter(self._echoes)
            # After a failure the echoes go on after close (the process is leaving).
            if sys.excepthook == self._quiet_excepthook and not self._failed:
                sys.excepthook = self._excepthook
            if sys.unraisablehook == self._quiet_unraisablehook and not self._failed:
                sys.unraisablehook = self._unraisablehook

    def _quiet_excepthook(self, kind, value, tb) -> None:
        """Tensorstore reports a write callback that finds its event loop closed (one per
        pending write of a failed save) through sys.excepthook: an echo too."""
        if not any(echo in str(value) for echo in _WriteFailureEchoes.ECHOES):
            self._excepthook(kind, value, tb)

    def _quiet_unraisablehook(self, unraisable) -> None:
        """Others come as unraisable exceptions (PyErr_WriteUnraisable from tensorstore's
        threads, as a bare traceback): echoes too."""
        if not any(echo in str(unraisable.exc_value) for echo in _WriteFailureEchoes.ECHOES):
            self._unraisablehook(unraisable)


def shape_diffs(want_tree, have_tree, limit: int = 8) -> str:
    """The parameters whose shapes differ between two trees ('' if none), for messages."""

    def shapes(tree):
        return {
            jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)
        }

    want, have = shapes(want_tree), shapes(have_tree)
    diffs = [
        f"{k}: checkpoint {have.get(k)} vs config {want.get(k)}"
        for k in sorted(set(want) | set(have))
        if want.get(k) != have.get(k)
    ]
    return "; ".join(diffs[:limit]) + (" ..." if len(diffs) > limit else "")


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the target shardings, so a restore reshards."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


# ----------------------------------------------------------------------------- inference


class TornStep(CheckpointError):
    """One step of a checkpoint that cannot be read: the file and the reason."""


def _candidates(path: str | Path) -> tuple[Path, list[int]]:
    """(checkpoints directory, its steps newest first) for a converted checkpoint, a
    training workdir, a checkpoints/ directory, or one step's directory (that step only)."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.name.isdigit() and (path / "config").exists():
        return path.parent, [int(path.name)]
    for directory in (path / "checkpoints", path):
        steps = sorted(int(p.name) for p in directory.glob("[0-9]*") if (p / "config").exists())
        if steps:
            return directory, steps[::-1]
    raise CheckpointError(f"no gptjax checkpoint in {path} (expected a workdir or checkpoint dir)")


def _torn(file: Path, error: BaseException) -> TornStep:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return TornStep(f"{file}: {reason}")


def _newest_readable(path: str | Path, read):
    """read(step_dir) on the newest step of `path` it succeeds on, for every reader of
    checkpoints (generate, eval, convert, init_from, finetune, predict). A step whose read
    raises TornStep (a torn copy, an interrupted write) is skipped with a warning naming
    the step and the file; none readable is one CheckpointError listing them."""
    directory, steps = _candidates(path)
    problems = []
    for step in steps:
        try:
            out = read(directory / str(step))
        except TornStep as e:
            problems.append(f"step {step}: {e}")
            log.warning("checkpoint step %d is torn (%s); trying an older step", step, e)
            continue
        if problems:
            log.warning("using step %d of %s, the newest intact one", step, directory)
        return out
    raise CheckpointError(f"no intact checkpoint in {path}: " + "; ".join(problems))


def save_params(directory: str | Path, config: dict, params, tokenizer: dict | None) -> Path:
    """Write a parameters-only checkpoint (step 0: params, config, tokenizer), as convert
    and export produce; written under a temporary name and renamed when complete."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"output directory {directory} exists and is not empty")
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        manager = ocp.CheckpointManager(
            tmp / "checkpoints",
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        )
        manager.save(
            0,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params, save_args=chunked(params)),
                config=ocp.args.JsonSave(config),
                tokenizer=ocp.args.JsonSave(tokenizer or {}),
            ),
        )
        manager.close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        directory.rmdir()
    tmp.rename(directory)
    return directory


def read_step_json(step_dir: Path, item: str) -> dict:
    """One JSON item (config, tokenizer) of a step directory; {} when it has none. Read as
    the file Orbax's JsonCheckpointHandler writes, so that a torn one is named."""
    if not (step_dir / item).exists():
        return {}
    file = step_dir / item / "metadata"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _torn(file, e) from None


def read_checkpoint_json(path: str | Path) -> tuple[dict, dict]:
    """(config dict, tokenizer record; {} where there is none) of the newest intact step
    of any checkpoint (see _candidates), without reading its arrays."""

    def read(step_dir: Path):
        _stored_params(step_dir)  # a step whose arrays' index is torn is no candidate
        return read_step_json(step_dir, "config"), read_step_json(step_dir, "tokenizer")

    return _newest_readable(path, read)


class _NoStepMetadataWarning(logging.Filter):
    """Orbax warns that an item directory has no _CHECKPOINT_METADATA (it lives in the
    step directory above): true of every healthy read of one item, so not shown; nor its
    note on an unreadable _METADATA, which the TornStep warning names."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "_CHECKPOINT_METADATA" not in text and "Failed to get item metadata" not in text


@contextlib.contextmanager
def _quiet_item_reads():
    quiet = _NoStepMetadataWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _params_item(step_dir: Path) -> tuple[str, str | None]:
    """(item, key): converted checkpoints hold "params", training ones "state"/params."""
    return ("params", None) if (step_dir / "params").exists() else ("state", "params")


def _stored_params(step_dir: Path):
    """The stored parameters' metadata tree of one step; TornStep when unreadable."""
    item, key = _params_item(step_dir)
    with _quiet_item_reads():
        try:
            stored = ocp.PyTreeCheckpointer().metadata(step_dir / item).item_metadata
        except Exception as e:
            raise _torn(step_dir / item / "_METADATA", e) from None
    if stored is None:  # what Orbax makes of an empty or truncated _METADATA
        raise TornStep(f"{step_dir / item / '_METADATA'}: empty or not valid JSON")
    return stored.tree[key] if key else stored.tree


def _read_params(step_dir: Path, abstract_params):
    """(config, params, tokenizer) of one step; TornStep for a damaged one."""
    config = read_step_json(step_dir, "config")
    tokenizer = read_step_json(step_dir, "tokenizer")
    item, key = _params_item(step_dir)
    stored = _stored_params(step_dir)
    with _quiet_item_reads():
        if abstract_params is None:
            # A sharding makes Orbax restore jax arrays; without one it returns numpy
            # arrays, which every jitted call would copy to the device again (~50 ms per
            # scoring batch of the eval bench's model).
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored
            )
        elif diffs := shape_diffs(abstract_params, stored):
            raise CheckpointError(f"{step_dir} holds parameters of other shapes: {diffs}")
        target = {key: abstract_params} if key else abstract_params
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                step_dir / item,
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            )
        except Exception as e:  # truncated array files
            raise _torn(step_dir / item, e) from None
    params = restored[key] if key else restored
    return config, params, tokenizer or None


def load_params(path: str | Path, abstract_params=None):
    """(config dict, params, tokenizer record or None) of the newest intact step of any
    checkpoint (see _candidates). Only the parameters are read from a training
    checkpoint, never the optimizer state. abstract_params (ShapeDtypeStructs, optionally
    with shardings) places them (a CheckpointError names the parameters whose stored
    shapes differ); without it they are read as stored, onto one device."""
    return _newest_readable(path, lambda d: _read_params(d, abstract_params))
