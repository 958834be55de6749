"""torchrun + DDP on CPU (gloo): 2 ranks x 64 rows train exactly as 1 process x 128 (--batch-size is the global batch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csrv2 import distributed
from csrv2.losses import residual_spread


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "csrv2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 512)
    x = (rng.normal(size=(6, 48))[labels] + 0.5 * rng.normal(size=(512, 48))).astype(np.float32)
    np.savez(folder / "train.npz", embeddings=x, labels=labels)
    return folder


def _train(folder, name: str, nproc: int, batch: int, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", "--embeddings", "train.npz", "--k", "4", "--hidden-dim", "192", "--epochs", "2", "--batch-size", str(batch),
            "--log-every", "1", "--dead-threshold", "1", "--device", "cpu", "--no-progress", "--out", name, *extra]
    if nproc == 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "csrv2", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    return _torchrun(nproc, *args, cwd=folder)


@pytest.mark.parametrize("contrastive", ["supervised", "self"])
def test_two_ranks_follow_one_process(data, contrastive):
    one = _train(data, f"one-{contrastive}", 1, 128, "--contrastive", contrastive)
    two = _train(data, f"two-{contrastive}", 2, 128, "--contrastive", contrastive)
    assert one.returncode == 0, one.stderr[-6000:]
    assert two.returncode == 0, two.stderr[-6000:]
    assert two.stdout.count("wrote") == 1  # only rank 0 speaks

    def log(name):
        return [json.loads(line) for line in (data / name / "train_log.jsonl").read_text().splitlines()]

    a, b = log(f"one-{contrastive}"), log(f"two-{contrastive}")
    assert len(a) == len(b) == 8 and any(r["loss_aux"] > 0 for r in a)  # AuxK took part
    for ra, rb in zip(a, b):
        for name in ("loss", "loss_k", "loss_4k", "loss_aux", "loss_cl", "dead_pct"):
            assert rb[name] == pytest.approx(ra[name], abs=1e-5), (ra["step"], name)
    wa, wb = (load_file(str(data / f"{ranks}-{contrastive}" / "model.safetensors")) for ranks in ("one", "two"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0)
    assert json.loads((data / f"two-{contrastive}" / "csrv2.json").read_text())["world_size"] == 2


def test_a_batch_that_does_not_split_is_refused_on_every_rank(data):
    result = _train(data, "odd", 2, 63)
    assert result.returncode != 0
    assert result.stderr.count("csrv2: error: batch_size 63 does not split evenly over 2 processes; pass a multiple of 2") == 2
    assert "exitcode: 2" in result.stderr and "site-packages/csrv2" not in result.stderr  # both ranks exit, no traceback of ours
    assert not (data / "odd").exists()


def test_helpers_are_no_ops_in_one_process():
    x = torch.arange(6.0).reshape(3, 2)
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather(x) is x and distributed.gather_labels(x) is x and distributed.sum_over_ranks(x) is x
    assert np.array_equal(distributed.shard(np.arange(5)), np.arange(5))
    distributed.same_everywhere(3, "anything")
    distributed.barrier()
    assert distributed.init(torch.device("cpu")) == torch.device("cpu")


def test_residual_spread_is_the_mse_about_the_mean():
    r = torch.randn(10, 4, dtype=torch.float64)
    expected = ((r - r.mean(0)) ** 2).mean()
    torch.testing.assert_close(residual_spread(r.sum(0), r.square().sum(), 10), expected)


def test_embed_under_torchrun_writes_a_shard_per_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("CSRV2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["embed", "--data", "bbc-news", "--split", "test", "--max-rows", "7", "--max-seq-length", "32", "--no-progress"]
    two = _torchrun(2, *args, "--out", "shards", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote") == 1 and "(2 shards)" in two.stdout
    bad = _torchrun(2, *args, "--out", "one.npz", cwd=tmp_path)
    assert bad.returncode != 0 and bad.stderr.count("pass a folder as --out") == 2
    from csrv2.cli import main
    from csrv2.data.training import load_training_data

    assert main([*args, "--out", str(tmp_path / "one.npz"), "--cache-dir", str(tmp_path / "cache1")]) == 0
    sharded, whole = load_training_data(tmp_path / "shards"), load_training_data(tmp_path / "one.npz")
    assert [len(s) for s in sharded.embeddings.shards] == [3, 4]  # contiguous parts, in rank order
    np.testing.assert_allclose(sharded.embeddings[np.arange(7)], whole.embeddings, atol=1e-5)
    np.testing.assert_array_equal(sharded.labels, whole.labels)


def test_a_one_process_checkpoint_resumes_on_two_ranks(data, monkeypatch):
    from csrv2.cli import main
    from csrv2.trainer import Trainer

    real_step = Trainer.train_step

    def crash_at_step_5(self, x, labels, k):
        if self.step == 5:
            raise KeyboardInterrupt
        return real_step(self, x, labels, k)

    monkeypatch.chdir(data)
    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--embeddings", "train.npz", "--k", "4", "--hidden-dim", "192", "--epochs", "2", "--batch-size", "128",
              "--log-every", "1", "--dead-threshold", "1", "--device", "cpu", "--no-progress", "--out", "moved", "--checkpoint-every", "2"])
    assert (data / "moved" / "checkpoints" / "step-000000004").is_dir()
    resumed = _train(data, "moved", 2, 128, "--checkpoint-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _train(data, "whole", 1, 128, "--checkpoint-every", "2")
    assert whole.returncode == 0, whole.stderr[-2000:]
    wa, wb = load_file(str(data / "whole" / "model.safetensors")), load_file(str(data / "moved" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-5, rtol=0)


TEXTS = ["Shares fell as the bank cut rates.", "The striker scored twice.", "Profits rose at the car maker.",
         "The keeper saved a late penalty.", "Markets rallied on the news.", "The home side won the cup.",
         "Bond yields climbed after the report.", "A late goal sealed the title.", "The retailer warned on sales.",
         "The coach praised his defence.", "Oil prices slid for a third day.", "Fans cheered the new signing."]
LABELS = np.array(["business", "sport"] * 6)


def _finetune(out, objective: str) -> None:
    """End-to-end training of a dropout-free MiniLM on TEXTS (dropout draws differ per rank, so it is off to compare)."""
    from csrv2.config import TrainConfig
    from csrv2.data.backbones import TextBackbone
    from csrv2.finetune import FinetuneConfig, finetune_text

    torch.set_num_threads(1)
    backbone = TextBackbone(max_seq_length=16)
    for module in backbone.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    finetune_text(backbone, TEXTS, LABELS, k=2, hidden_dim=64, out=out, progress=False,
                  train=TrainConfig(epochs=1, batch_size=4, lr=1e-3, log_every=1, device="cpu"),
                  finetune=FinetuneConfig(objective=objective, backbone_lr=1e-4, grad_accum=2, mrl_dims=(2, 8)))


def _finetune_rank(rank: int, world: int, port: int, out, objective: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        _finetune(out, objective)
    finally:
        distributed.close()


@pytest.mark.parametrize("objective", ["csrv2", "matryoshka"])
def test_end_to_end_training_on_two_ranks_follows_one_process(tmp_path, objective, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _finetune(tmp_path / "one", objective)
    port = _free_port()
    mp.spawn(_finetune_rank, args=(2, port, tmp_path / "two", objective), nprocs=2)

    def log(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    assert len(log("one")) == 2 and log("two") == pytest.approx(log("one"), abs=1e-5)
    # Adam's first steps move each weight by about lr whatever the size of its gradient, so the few weights
    # whose gradient is rounding noise (key biases: exactly 0 in exact arithmetic) land anywhere within that;
    # every other weight must agree to 1e-5.
    weights = sorted((tmp_path / "one").rglob("*.safetensors"))
    assert weights
    for path in weights:
        a, b = load_file(str(path)), load_file(str(tmp_path / "two" / path.relative_to(tmp_path / "one")))
        diff = torch.cat([(b[name] - a[name]).abs().reshape(-1) for name in a])
        assert float((diff > 1e-5).float().mean()) < 1e-3 and float(diff.max()) <= 2 * 2 * 1e-3, path.name


def _disagree_rank(rank: int, world: int, port: int, folder) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    distributed.init(torch.device("cpu"))
    try:
        distributed.same_everywhere(100 + rank, "data sizes")
    except ValueError as e:
        (folder / f"rank{rank}.txt").write_text(str(e))
    finally:
        distributed.close()


def test_ranks_that_see_different_data_all_stop(tmp_path):
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(_disagree_rank, args=(2, port, tmp_path), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("ranks see different data sizes: [100, 101]")
