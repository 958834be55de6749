"""The life of one training run, shared by every training loop: its folder, lock, resume, log, checkpoints and end.

A run folder `out` holds, while training, `.lock` (held for the run's lifetime, so a second process
training into the same folder stops at once), `run.json` (the run's settings), `train_log.jsonl` (one
JSON line per `log_every` steps) and `checkpoints/step-N/`: the model at step N, its settings
(csrv2.json) and `state.pt`, the resume state (optimizer, step, RNG and the loop's own tensors), read
with `weights_only=True`. A checkpoint folder is built aside and renamed into place, so it is whole or
absent; only the newest is kept. At the end the loop writes its model and the checkpoints go.

Resuming checks the newest checkpoint whole before any file changes: its state file (readable, the
keys, shapes and step this run expects), its settings (the same options, with fields added to a
config since then at their defaults) and its data (the same size and fingerprint). A loss that turns
NaN or Inf stops the run with one line, the last good checkpoint kept. Under torchrun only rank 0
locks and writes; every rank reads the checkpoint it resumes from. `out=None` is a run in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as dist
from .atomic import write_folder, write_json, write_text
from .data.cache import fingerprint as data_fingerprint
from .errors import InputError
from .model import SETTINGS_FILE, WEIGHTS_FILE, read_settings

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded against each other
    fcntl = None

LOG_FILE = "train_log.jsonl"
STATE_FILE = "state.pt"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
SAMPLE_ROWS = 1024
# Settings a resumed run may change: what the run derives from the others, and the number of processes.
VOLATILE = ("csrv2_version", "step", "total_steps", "world_size")
DATA_KEYS = ("samples", "data_fingerprint")
START_OVER = "the checkpoint cannot be resumed; start over with --overwrite"


class Run:
    """One training run: `with Run(...) as run:` around the loop; `begin` prepares the folder and resumes,
    `log` and `checkpoint` at their steps, `watch` each step's loss, `finish` writes the model.

    out: the run folder, or None for a run in memory (no files; the same progress bar and checks).
    replaces_folder: the final model replaces the whole folder, so any folder already there is refused
    (unless resume or overwrite, and overwrite empties it); else only a folder that holds a run is, and
    overwrite clears its checkpoints and log. The folder checks run here, before any work, and again
    under the lock when the run begins.
    """

    def __init__(
        self,
        out: str | os.PathLike | None,
        total_steps: int,
        *,
        resume: bool = False,
        overwrite: bool = False,
        replaces_folder: bool = False,
        log_every: int = 10,
        checkpoint_every: int = 0,
        progress: bool = True,
        desc: str = "train",
    ) -> None:
        if resume and overwrite:
            raise InputError("resume and overwrite exclude each other; choose one")
        self.out = None if out is None else Path(out)
        self.total_steps, self.log_every, self.checkpoint_every = total_steps, log_every, checkpoint_every
        self.resume, self.overwrite, self.replaces_folder = resume, overwrite, replaces_folder
        self.progress, self.desc = progress, desc
        self.guard = LossGuard()
        self.settings: dict = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.bar = None
        self._lock: int | None = None  # the open lock file while this process holds it
        self._check_folder()

    # --- the run, top to bottom ---------------------------------------------------------------
    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        self._unlock()

    def begin(self, optimizer: torch.optim.Optimizer, settings: dict | None = None, tensors: dict[str, torch.Tensor] | None = None,
              load_weights: Callable[[Path], None] | None = None) -> dict | None:
        """Take the folder (lock it, clear it for overwrite) and, when resuming, restore the newest checkpoint.

        settings: what defines the run (configs as dataclasses, the data's size and `fingerprint`, ...),
        written to run.json and every checkpoint and compared on resume; tensors: the loop's own state
        by name (e.g. dead-latent counters), saved in checkpoints. Resuming loads the optimizer, the RNG
        and (load_weights(folder)) the model, then returns the checkpoint's state: "step" and `tensors`
        by name, on the CPU; a fresh run returns None.
        """
        self.optimizer, self.settings, tensors = optimizer, settings or {}, tensors or {}
        restored = None
        if self.out is not None:
            dist.barrier()  # every rank has looked at the folder before rank 0 changes it
            failure = None
            if dist.is_main():
                try:
                    self._take_folder()
                except InputError as e:
                    failure = str(e)
            failure = _from_main(failure)  # every rank stops when rank 0 cannot take the folder
            if failure is not None:
                raise InputError(failure)
            if self.resume:
                restored = self._restore(tensors, load_weights)
            if dist.is_main():
                if self.overwrite:
                    self._clear()
                elif restored is not None:
                    truncate_log(self.out / LOG_FILE, restored["step"])
                write_json(self.out / RUN_FILE, self.settings_json(0 if restored is None else restored["step"]))
            dist.barrier()
        start = 0 if restored is None else restored["step"]
        self.bar = tqdm(total=self.total_steps, initial=start, desc=self.desc, unit="step", disable=not (self.progress and dist.is_main()))
        return restored

    def watch(self, loss: torch.Tensor, step: int) -> None:
        """Call with each step's loss (0-dim) before the optimizer applies it; step: the step's number (from 1).
        Raises at once where reading the loss is free (one CPU process); elsewhere `check` raises later."""
        bad = self.guard.watch(loss, step)
        if bad is not None:
            raise self._diverged(*bad)

    def advance(self) -> None:
        """One step done (the progress bar)."""
        self.bar.update(1)

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def log(self, record: dict, **postfix) -> None:
        """Append record (one JSON line, with its "step") to the log, after checking the steps since the last check;
        postfix: what the progress bar shows. Every rank calls it."""
        self.check()
        if self.out is not None and dist.is_main():
            # appended, not rewritten: one short write per line; a line torn by a crash is dropped on resume
            with open(self.out / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.bar.set_postfix(**postfix)

    def checkpoint_due(self, step: int, steps_per_epoch: int) -> bool:
        """A checkpoint after this step (every checkpoint_every steps, else each epoch; none at the last step)."""
        return self.out is not None and step < self.total_steps and step % (self.checkpoint_every or steps_per_epoch) == 0

    def checkpoint(self, step: int, tensors: dict[str, torch.Tensor], fill: Callable[[Path], None]) -> None:
        """Write checkpoints/step-N whole: fill(folder) writes the model, then the settings and the state; older
        checkpoints go. Every rank calls it (the check is collective); rank 0 writes."""
        self.check()
        self._check_weights(step)  # on every rank: their weights are the same, so all stop together
        if self.out is None or not dist.is_main():
            return
        state = {"optimizer": self.optimizer.state_dict(), "step": step, "rng": torch.get_rng_state(),
                 **{name: t.detach().cpu() for name, t in tensors.items()}}

        def build(folder: Path) -> None:
            fill(folder)
            write_json(folder / SETTINGS_FILE, self.settings_json(step))
            torch.save(state, folder / STATE_FILE)  # inside the folder built aside: whole or absent with it

        write_checkpoint(self.out, step, build)

    def finish(self, step: int, write: Callable[[dict], None] | None = None) -> None:
        """The last check, then (rank 0) write(settings) writes the model and the checkpoints go. Every rank calls it."""
        self.check()
        self._check_weights(step)
        if self.out is None or not dist.is_main():
            return
        if write is not None:
            write(self.settings_json(step))
        shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)

    def check(self) -> None:
        """Raise if a step since the run began had a non-finite loss (on every rank, from any rank's loss)."""
        bad = self.guard.first_bad()
        if bad is not None:
            raise self._diverged(*bad)

    def settings_json(self, step: int) -> dict:
        """The settings as written to run.json, checkpoints and the final model (csrv2.json)."""
        return {"csrv2_version": version("csrv2"), **as_json(self.settings), "step": step, "total_steps": self.total_steps,
                "world_size": dist.world_size()}

    # --- named steps ---------------------------------------------------------------------------
    def _check_folder(self, taken: bool = False) -> None:
        """Refuse what the folder cannot take; reads only. taken: this process made and locked the folder, so
        a folder that holds only the lock file is new."""
        if self.out is None:
            return
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: exists and is not a folder; choose another --out")
        if self.resume:
            if not self.out.is_dir() or latest_checkpoint(self.out) is None:
                raise InputError(f"{self.out}: has no checkpoint to resume from; start the run without --resume")
        elif self.overwrite:
            return
        elif self.replaces_folder and self.out.exists() and not (taken and set(os.listdir(self.out)) <= {LOCK_FILE}):
            raise InputError(f"{self.out}: already exists; choose another folder, pass --overwrite, or --resume a run")
        elif any((self.out / name).exists() for name in (CHECKPOINTS, LOG_FILE, WEIGHTS_FILE, SETTINGS_FILE)):
            raise InputError(f"{self.out}: already holds a training run; pass --resume to continue it or --overwrite to start over")

    def _take_folder(self) -> None:
        """Rank 0: create the folder, lock it, and check it again now that no other run can change it."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.out}: cannot create the folder ({e}); choose another --out") from e
        self._lock = lock_folder(self.out)
        self._check_folder(taken=True)

    def _restore(self, tensors: dict[str, torch.Tensor], load_weights: Callable[[Path], None] | None) -> dict:
        """Check the newest checkpoint whole (settings and data, then the state), then load it; nothing is written."""
        ckpt = latest_checkpoint(self.out)
        try:
            saved = read_settings(ckpt)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{ckpt / SETTINGS_FILE}: cannot be read ({e}); {START_OVER}") from e
        refuse_other_settings(ckpt, saved, self.settings)  # first: other options also make other shapes in the state
        state = read_state(ckpt / STATE_FILE, self.total_steps, self.optimizer, {"rng": torch.get_rng_state(), **tensors})
        if load_weights is not None:
            load_weights(ckpt)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # what read_state does not check, torch does
            raise InputError(f"{ckpt / STATE_FILE}: its optimizer state does not fit this run's ({e}); {START_OVER}") from e
        torch.set_rng_state(state["rng"])
        return state

    def _clear(self) -> None:
        """Start over: drop the folder's previous run (all of it when the model replaces the folder), keeping the lock."""
        if self.replaces_folder:
            for entry in self.out.iterdir():
                if entry.name == LOCK_FILE:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        else:
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
            (self.out / LOG_FILE).unlink(missing_ok=True)

    def _check_weights(self, step: int) -> None:
        """A model is never written with non-finite weights (a finite loss can still end in an overflowing update)."""
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not bool(torch.isfinite(p).all()):
                    raise self._diverged(step, "the weights are not finite")

    def _diverged(self, step: int, what: float | str) -> InputError:
        ckpt = None if self.out is None else latest_checkpoint(self.out)
        kept = f"the last good checkpoint is kept in {ckpt}; " if ckpt is not None else ""
        what = f"the loss is {what}" if isinstance(what, float) else what
        return InputError(f"training diverged at step {step}: {what}; {kept}lower --lr or check the training data")

    def _unlock(self) -> None:
        if self._lock is not None:
            unlock_folder(self.out, self._lock)
            self._lock = None


class LossGuard:
    """Finds the first step whose loss is NaN or Inf.

    In one CPU process reading each step's loss costs nothing, so `watch` answers at once (before the
    optimizer applies the step). Elsewhere a read would make the host wait for the device every step,
    so the first bad step and its loss stay on the device, and `first_bad` reads them (with every rank's)
    when the loop checks: at each log step, checkpoint and the end, which already wait for the device.
    eager: None decides from the first loss's device.
    """

    def __init__(self, eager: bool | None = None) -> None:
        self.eager = eager
        self.bad_step: torch.Tensor | None = None  # 0-dim, 0 while every loss was finite
        self.bad_loss: torch.Tensor | None = None

    def watch(self, loss: torch.Tensor, step: int) -> tuple[int, float] | None:
        if self.eager is None:
            self.eager = loss.device.type == "cpu" and not dist.active()
        if self.eager:
            value = float(loss.detach())
            return None if math.isfinite(value) else (step, value)
        loss = loss.detach().float().reshape(())
        if self.bad_step is None:
            self.bad_step = torch.zeros((), dtype=torch.long, device=loss.device)
            self.bad_loss = torch.zeros((), device=loss.device)
        new = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step = torch.where(new, step, self.bad_step)
        self.bad_loss = torch.where(new, loss, self.bad_loss)
        return None

    def first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss on any rank, or None; collective across processes."""
        if self.eager is not False:
            return None  # eager: `watch` raised already; None: no step yet
        steps, losses = dist.gather_labels(self.bad_step.view(1)).tolist(), dist.gather_labels(self.bad_loss.view(1)).tolist()
        bad = [(step, loss) for step, loss in zip(steps, losses, strict=True) if step > 0]
        return min(bad) if bad else None


def _from_main(message: str | None) -> str | None:
    """Rank 0's message on every rank (so that all stop together when rank 0 must)."""
    if not dist.active():
        return message
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --- the folder lock ---------------------------------------------------------------------------------
def lock_folder(out: Path) -> int | None:
    """Take an exclusive lock on out/.lock (non-blocking) and return its open file; InputError if another
    process holds it. The lock goes with the process, so a killed run leaves none behind."""
    if fcntl is None:
        return None
    path = out / LOCK_FILE
    busy = InputError(f"{out}: another process is training into this folder (it holds {path}); wait for it to end or choose another --out")
    for _ in range(3):  # the holder may delete the file as it ends, after this process opened it: lock the new one
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # an empty file whose lock is the point: nothing to write atomically
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy from None
        except OSError as e:
            os.close(fd)
            raise InputError(f"{out}: cannot lock {path} ({e}); train into a folder on a local disk") from e
        if _is_file(fd, path):
            return fd
        os.close(fd)
    raise busy


def unlock_folder(out: Path, fd: int | None) -> None:
    """Delete out/.lock if it is still this lock's file (a model that replaced the folder took it away), then release it."""
    if fd is None:
        return
    path = out / LOCK_FILE
    if _is_file(fd, path):
        path.unlink()
    os.close(fd)


def _is_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


# --- checkpoints and the log -------------------------------------------------------------------------
def write_checkpoint(out: Path, step: int, fill: Callable[[Path], None]) -> None:
    """Write out/checkpoints/step-N whole (fill(folder) builds it aside, then it is renamed), then drop older ones."""
    name = f"step-{step:09d}"
    write_folder(out / CHECKPOINTS / name, fill, overwrite=True)
    for old in (out / CHECKPOINTS).glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest whole checkpoint folder under out/checkpoints (one with its state file), or None."""
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no step twice; a line a crash
    cut short is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


# --- what a resume checks ----------------------------------------------------------------------------
def read_state(path: Path, total_steps: int, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    """The resume state in `path` (on the CPU), checked whole before anything uses it.

    It must be a torch file of tensors and numbers only (read with weights_only=True) holding exactly
    optimizer, step and `tensors`' names: a step in [0, total_steps], each tensor with the shape and
    dtype of its counterpart in `tensors`, and an optimizer state for `optimizer`'s parameters.
    Anything else raises a one-line InputError naming the file.
    """
    if path.stat().st_size == 0:
        raise InputError(f"{path}: is empty; {START_OVER}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: holds objects other than tensors and numbers, which csrv2 never loads; {START_OVER}") from e
    except Exception as e:  # damaged bytes fail in many ways (EOFError, RuntimeError, KeyError, ...): all say the same
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: is not a readable torch file ({reason}); {START_OVER}") from e
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a resume state; {START_OVER}")
    expected = {"optimizer", "step", *tensors}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected, key=str)
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"holds unexpected {', '.join(map(str, extra))}"
        raise InputError(f"{path}: {what} (a resume state holds {', '.join(sorted(expected))}); {START_OVER}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
        raise InputError(f"{path}: step {step!r} is not in [0, {total_steps}], this run's steps; {START_OVER}")
    for name, like in tensors.items():
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.shape != like.shape or value.dtype != like.dtype:
            found = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{path}: {name} is {found}, this run's is {tuple(like.shape)} {like.dtype}; {START_OVER}")
    _check_optimizer_state(path, state["optimizer"], optimizer)
    return state


def _check_optimizer_state(path: Path, saved, optimizer: torch.optim.Optimizer) -> None:
    """saved: an optimizer's state_dict; it must have `optimizer`'s parameter groups, and per parameter
    tensors of its shape (a scalar "step" aside)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    entries = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(entries, dict) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise InputError(f"{path}: its optimizer entry is not an optimizer state; {START_OVER}")
    sizes = [len(g["params"]) if isinstance(g["params"], list) else -1 for g in groups]
    expected = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != expected:
        raise InputError(f"{path}: the optimizer has parameter groups of {sizes} tensors, this run's {expected}; {START_OVER}")
    for index, entry in entries.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise InputError(f"{path}: the optimizer holds state for parameter {index!r} of {len(params)}; {START_OVER}")
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor) or (name != "step" and value.shape != params[index].shape):
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputError(f"{path}: the optimizer's {name} of parameter {index} is {found}, the parameter "
                                 f"{tuple(params[index].shape)}; {START_OVER}")


def refuse_other_settings(ckpt: Path, saved: dict, now: dict) -> None:
    """Raise unless the checkpoint's settings (csrv2.json) are this run's: options first, then data."""
    options, data = [], []
    for key, value in now.items():
        if key in VOLATILE or key not in saved:  # a setting the checkpoint predates cannot be compared
            continue
        if dataclasses.is_dataclass(value):
            changed = config_changes(saved[key], value)
            if changed:
                options.append(f"{key} options ({'; '.join(changed)})")
        elif as_json(value) != saved[key]:
            if key in DATA_KEYS:
                data.append(key)
            else:
                options.append(f"{key} ({saved[key]} then, {as_json(value)} now)")
    if options:
        raise InputError(f"{ckpt}: was trained with other {', '.join(options)}; resume with the same options")
    if "samples" in data:
        raise InputError(f"{ckpt}: was trained on {saved['samples']} samples, this data has {now['samples']}; resume on the same data")
    if data:
        raise InputError(f"{ckpt}: was trained on other data of the same size (its fingerprint differs); resume on the same data")


def config_changes(saved, now) -> list[str]:
    """The fields of config `now` (a dataclass: TrainConfig, FinetuneConfig, HeadConfig) whose value differs in
    `saved` (its dict from a checkpoint), as "field then -> now"; a field added since the checkpoint counts
    at its default, and one removed since is ignored."""
    names = [f.name for f in dataclasses.fields(now)]
    known = {k: v for k, v in saved.items() if k in names} if isinstance(saved, dict) else {}
    try:  # built as a config, so missing fields take their defaults, resolved the way this version resolves them
        then = as_json(type(now)(**known))
    except (TypeError, ValueError):  # a required field missing, or a value this version refuses: compare as saved
        then = known
    now = as_json(now)
    return [f"{name} {then.get(name, 'unset')} then, {now[name]} now" for name in names if then.get(name, dataclasses.MISSING) != now[name]]


def as_json(value):
    """value as JSON reads it back (dataclasses as dicts, tuples as lists): what settings compare as."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(value) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


# --- the data's fingerprint --------------------------------------------------------------------------
def fingerprint(*parts) -> str:
    """sha256 (hex) of each part's size, shape and dtype and up to SAMPLE_ROWS evenly spaced rows of it.

    parts: arrays (n, ...) (memory maps and sharded arrays too), lists of texts, or None. It reads at
    most SAMPLE_ROWS rows of each, so it costs the same on data of any size, and tells apart other data
    of the same shape.
    """
    digest = hashlib.sha256()
    for part in parts:
        if part is None:
            digest.update(b"none;")
            continue
        rows = np.unique(np.linspace(0, len(part) - 1, min(len(part), SAMPLE_ROWS)).astype(np.int64))
        sample = [str(part[i]) for i in rows] if isinstance(part, (list, tuple)) else np.ascontiguousarray(part[rows])
        digest.update(f"{len(part)} rows, sample {data_fingerprint(sample)};".encode())
    return digest.hexdigest()


__all__ = ["LOG_FILE", "STATE_FILE", "LossGuard", "Run", "config_changes", "fingerprint", "latest_checkpoint", "read_state",
           "truncate_log", "write_checkpoint"]
