"""The run lifecycle (run.py): the folder lock, resume checked whole before any file changes, settings and data
compared on resume, and the stop at the first non-finite loss."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from csrv2 import InputError, TrainingData, train
from csrv2.config import HeadConfig, TrainConfig
from csrv2.run import LOCK_FILE, LossGuard, Run, config_changes, fingerprint
from csrv2.trainer import Trainer

SMALL = dict(k=2, hidden_dim=64, epochs=3, batch_size=32, log_every=1, checkpoint_every=3, progress=False)


def clustered(n=192, d=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, d))[labels] + 0.4 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def files(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_at(step):
    """A Trainer.train_step that stops the run (as a crash would) when asked for step `step` + 1."""
    original = Trainer.train_step

    def interrupted(self, *args):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self, *args)

    return interrupted


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run folder stopped after step 7: its newest checkpoint is step 6, its log has steps 1-7."""
    x, y = clustered()
    out = tmp_path_factory.mktemp("run") / "cut"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", interrupt_at(7))
        with pytest.raises(KeyboardInterrupt):
            train(x, y, out=out, **SMALL)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000006"]
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# --- the lock ------------------------------------------------------------------------------------
def hold_lock(folder):
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_run_on_a_locked_folder_stops_before_touching_a_file(interrupted_run, tmp_path):
    x, y = clustered()
    run = copy_of(interrupted_run, tmp_path)
    fd = hold_lock(run)  # another process training into the folder
    before = files(run)
    try:
        for options in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(InputError, match=f"^{re.escape(str(run))}: another process is training into this folder") as e:
                train(x, y, out=run, **options, **SMALL)
            assert "\n" not in str(e.value)
            assert files(run) == before  # the checkpoint and the log are the other run's, untouched
    finally:
        os.close(fd)
    resumed = train(x, y, out=run, resume=True, **SMALL)  # the lock went with its holder
    assert not (run / LOCK_FILE).exists() and not (run / "checkpoints").exists()
    assert torch.equal(resumed.weight, train(x, y, **SMALL).weight)


def test_the_command_line_says_one_line_and_exits_2_on_a_locked_folder(tmp_path):
    x, _ = clustered()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run").mkdir()
    fd = hold_lock(tmp_path / "run")
    try:
        args = ["train", "--embeddings", str(tmp_path / "x.npy"), "--out", str(tmp_path / "run"), "--hidden-dim", "64", "--no-progress"]
        result = subprocess.run([sys.executable, "-m", "csrv2", *args], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(fd)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"csrv2: error: {tmp_path / 'run'}: another process is training into this folder "
                                                  f"(it holds {tmp_path / 'run' / LOCK_FILE}); wait for it to end or choose another --out"]
    assert sorted(os.listdir(tmp_path / "run")) == [LOCK_FILE]


def test_the_lock_is_released_on_error(tmp_path):
    x, y = clustered()

    def fail(*args):
        raise RuntimeError("a failing step")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", fail)
        with pytest.raises(RuntimeError, match="a failing step"):
            train(x, y, out=tmp_path / "run", **SMALL)
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    os.close(hold_lock(tmp_path / "run"))  # free to take


# --- resume: the state file is checked whole before anything changes -------------------------
def _save(state):
    return lambda path: torch.save(state, path)


class Payload:
    """Any class: a state file that names one is a pickle payload, which weights_only refuses."""


def _damaged(name):
    """(how to damage state.pt, a fragment of the error) for each variant."""
    def edit(change):
        def damage(path):
            state = torch.load(path, weights_only=True)
            change(state)
            torch.save(state, path)
        return damage

    def shape_of_moment(state):
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)

    return {
        "empty": (lambda path: path.write_bytes(b""), "is empty"),
        "truncated": (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "not a readable torch file"),
        "not torch": (lambda path: path.write_bytes(b"step 6, honest\n" * 20), "not a readable torch file"),
        "pickle payload": (edit(lambda s: s.update(payload=Payload())), "objects other than tensors"),
        "missing key": (edit(lambda s: s.pop("counters")), "lacks counters"),
        "extra key": (edit(lambda s: s.update(extra=torch.zeros(1))), "unexpected extra"),
        "negative step": (edit(lambda s: s.update(step=-1)), "step -1 is not in \\[0, 18\\]"),
        "step past the end": (edit(lambda s: s.update(step=19)), "step 19 is not in \\[0, 18\\]"),
        "float step": (edit(lambda s: s.update(step=6.0)), "step 6.0 is not"),
        "counters shape": (edit(lambda s: s.update(counters=torch.zeros(3, dtype=torch.long))), "counters is \\(3,\\) torch.int64"),
        "counters dtype": (edit(lambda s: s.update(counters=torch.zeros(64))), "counters is \\(64,\\) torch.float32"),
        "rng": (edit(lambda s: s.update(rng=torch.zeros(4, dtype=torch.uint8))), "rng is \\(4,\\)"),
        "optimizer moment shape": (edit(shape_of_moment), "exp_avg of parameter 0 is \\(3,\\)"),
        "optimizer groups": (edit(lambda s: s["optimizer"].update(param_groups=[])), "parameter groups of \\[\\] tensors"),
    }[name]


@pytest.mark.parametrize("damage", ["empty", "truncated", "not torch", "pickle payload", "missing key", "extra key", "negative step",
                                    "step past the end", "float step", "counters shape", "counters dtype", "rng", "optimizer moment shape",
                                    "optimizer groups"])
def test_a_damaged_state_file_is_refused_in_one_line_and_nothing_changes(interrupted_run, tmp_path, damage):
    x, y = clustered()
    run = copy_of(interrupted_run, tmp_path)
    state = run / "checkpoints" / "step-000000006" / "state.pt"
    change, message = _damaged(damage)
    change(state)
    before = files(run)
    with pytest.raises(InputError, match=message) as e:
        train(x, y, out=run, resume=True, **SMALL)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{state}: ")
    assert files(run) == before  # the log keeps step 7, nothing was written


def test_resume_on_other_data_of_the_same_shape_is_refused(interrupted_run, tmp_path):
    x, y = clustered()
    other, _ = clustered(seed=1)
    run = copy_of(interrupted_run, tmp_path)
    before = files(run)
    with pytest.raises(InputError, match="was trained on other data of the same size .*; resume on the same data"):
        train(other, y, out=run, resume=True, **SMALL)
    with pytest.raises(InputError, match="was trained on other data"):  # the labels are part of the data
        train(x, np.roll(y, 1), out=run, resume=True, **SMALL)
    with pytest.raises(InputError, match="was trained with other train options \\(lr 0.0001 then, 0.001 now\\)"):
        train(x, y, out=run, resume=True, lr=1e-3, **SMALL)
    with pytest.raises(InputError, match="other head options \\(hidden_dim 64 then, 128 now; k_aux 4 then, 8 now\\), k_init"):
        train(x, y, out=run, resume=True, **{**SMALL, "hidden_dim": 128})
    assert files(run) == before


def test_settings_saved_before_a_field_existed_resume_with_its_default(interrupted_run, tmp_path):
    x, y = clustered()
    run = copy_of(interrupted_run, tmp_path)
    settings_file = run / "checkpoints" / "step-000000006" / "csrv2.json"
    settings = json.loads(settings_file.read_text())
    del settings["train"]["tf32"], settings["head"]["normalize"], settings["data_fingerprint"]  # fields and keys added since
    settings["train"]["a_removed_field"] = 1
    settings_file.write_text(json.dumps(settings))
    resumed = train(x, y, out=run, resume=True, **SMALL)
    assert torch.equal(resumed.weight, train(x, y, **SMALL).weight)


def test_config_changes_fill_fields_the_checkpoint_predates():
    cfg = TrainConfig(lr=1e-3)
    saved = {k: v for k, v in cfg.to_dict().items() if k != "tf32"}
    assert config_changes(saved, cfg) == []
    assert config_changes({**saved, "tf32": False}, cfg) == ["tf32 False then, True now"]
    assert config_changes({**saved, "lr": 1e-4}, cfg) == ["lr 0.0001 then, 0.001 now"]
    head = HeadConfig(16, 0, 2)  # hidden_dim resolved to 64: a saved 0 resolves the same way
    assert config_changes({"input_dim": 16, "hidden_dim": 0, "k": 2}, head) == []
    assert config_changes({"input_dim": 16, "hidden_dim": 32, "k": 2}, head)[0].startswith("hidden_dim 32 then, 64 now")


def test_the_fingerprint_sees_rows_dtype_and_texts(tmp_path):
    x = np.random.default_rng(0).normal(size=(5000, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert fingerprint(x, None) == fingerprint(np.load(tmp_path / "x.npy", mmap_mode="r"), None)  # a memory map reads the same
    changed = x.copy()
    changed[0, 0] += 1  # row 0 is always sampled
    assert fingerprint(changed, None) != fingerprint(x, None)
    assert fingerprint(x.astype(np.float64), None) != fingerprint(x, None)
    assert fingerprint(x, None) != fingerprint(x, np.zeros(5000))
    assert fingerprint(["a", "bc"]) != fingerprint(["ab", "c"]) and fingerprint(["a", "bc"]) == fingerprint(["a", "bc"])


# --- a loss that turns NaN -------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_before_its_step_and_keeps_the_last_checkpoint(tmp_path):
    x, y = clustered()
    out = tmp_path / "run"
    trainer = Trainer(HeadConfig(16, 64, 2), TrainConfig(epochs=3, batch_size=32, log_every=1, checkpoint_every=2), TrainingData(x, y), out,
                      progress=False)
    objective = trainer.objective

    def poisoned(*args):
        losses, fired = objective(*args)
        if trainer.step == 5:  # step 6 goes bad
            losses["loss"] = losses["loss"] * float("nan")
        return losses, fired

    trainer.objective = poisoned
    with pytest.raises(InputError) as e:
        trainer.fit()
    kept = out / "checkpoints" / "step-000000004"
    assert str(e.value) == (f"training diverged at step 6: the loss is nan; the last good checkpoint is kept in {kept}; "
                            "lower --lr or check the training data")
    assert all(torch.isfinite(p).all() for p in trainer.head.parameters())  # the NaN step was not applied
    assert sorted(os.listdir(out)) == ["checkpoints", "run.json", "train_log.jsonl"]  # no model, no lock
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    resumed = train(x, y, out=out, resume=True, **{**SMALL, "checkpoint_every": 2})  # the kept checkpoint resumes
    assert torch.equal(resumed.weight, train(x, y, **SMALL).weight)


def test_the_device_side_guard_reports_the_first_bad_step_when_asked():
    guard = LossGuard(eager=False)  # as on a GPU: nothing is read until first_bad
    assert guard.watch(torch.tensor(1.0), 1) is None and guard.watch(torch.tensor(float("inf")), 2) is None
    assert guard.watch(torch.tensor(float("nan")), 3) is None
    assert guard.first_bad() == (2, float("inf"))
    assert LossGuard(eager=True).watch(torch.tensor(float("nan")), 4)[0] == 4


def test_no_checkpoint_is_written_with_non_finite_weights(tmp_path):
    weight = torch.nn.Parameter(torch.ones(3))
    with Run(tmp_path / "run", 10, checkpoint_every=1, progress=False) as run:
        run.begin(torch.optim.Adam([weight]))
        run.checkpoint(1, {}, lambda folder: None)
        with torch.no_grad():
            weight[1] = float("inf")
        with pytest.raises(InputError, match="at step 2: the weights are not finite; the last good checkpoint is kept in .*step-000000001"):
            run.checkpoint(2, {}, lambda folder: None)
        with pytest.raises(InputError, match="the weights are not finite"):
            run.finish(2, lambda settings: pytest.fail("a model was written"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000001"]


def test_the_matryoshka_loop_stops_on_a_nan_loss(monkeypatch):
    from csrv2.eval import baselines

    x, y = clustered()
    calls = []
    real = baselines.matryoshka_loss

    def sometimes_nan(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(baselines, "matryoshka_loss", sometimes_nan)
    with pytest.raises(InputError, match="^training diverged at step 3: the loss is nan; lower --lr"):
        baselines.train_matryoshka(TrainingData(x, y), TrainConfig(epochs=2, batch_size=32, device="cpu"), (2, 4), progress=False)


# --- the folder --------------------------------------------------------------------------------------
def test_a_folder_the_model_replaces_is_emptied_for_overwrite_and_the_lock_goes(tmp_path):
    weight = torch.nn.Parameter(torch.ones(2))
    with Run(tmp_path / "new", 4, replaces_folder=True, progress=False) as run:  # a folder the run makes itself
        run.begin(torch.optim.Adam([weight]))
        run.finish(0, lambda settings: None)
    assert sorted(os.listdir(tmp_path / "new")) == ["run.json"]
    out = tmp_path / "model"
    (out / "old").mkdir(parents=True)
    (out / "stale.txt").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        Run(out, 4, replaces_folder=True)
    with Run(out, 4, overwrite=True, replaces_folder=True, progress=False) as run:
        run.begin(torch.optim.Adam([weight]), {"train": TrainConfig()})
        assert sorted(os.listdir(out)) == [LOCK_FILE, "run.json"]
        assert json.loads((out / "run.json").read_text())["train"]["lr"] == 1e-4
    assert sorted(os.listdir(out)) == ["run.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        Run(tmp_path / "file", 4, overwrite=True)
