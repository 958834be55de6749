"""Time csrv2's training step against the official CSRv2 recipe's step, on the same data and weights.

What is measured: samples/s of whole optimizer steps (forward, backward, Adam(lr 1e-4, eps 6.25e-10),
dead-latent bookkeeping) over one short k-annealing schedule, k_t = csrv2.schedule.k_at_step(...) from
k_init = min(64, h/4) down to k, followed step for step by both implementations.

    ours:     csrv2.trainer.Trainer.train_step itself (step_losses, the Trainer's own Adam, the counter
              update), on a Trainer whose head and counters are set to the shared starting point.
    official: `official_losses` below with plain torch.optim.Adam, re-implemented from the recipe of
              Y-Research-SBU/CSRv2 (text/CSR_training.py, text/model_zoo.py). It keeps what makes that
              step cost what it costs:
              - three forward passes on the same batch: at k, at 4k, and at k again (the second
                contrastive "view", identical to the first as there is no augmentation);
              - every pass does the full encoder GEMM, scatters its top-k into a zero-filled dense
                (batch, h) latent matrix and decodes it with a dense (batch, h) x (h, d) GEMM;
              - every pass also runs its own AuxK (top k_aux of the pre-activations masked to the dead
                latents, zero-filled, dense decode), although only pass 1's enters the loss;
              - every top-k call updates the dead statistics: stats *= 1 - fired; stats += 1;
              - the supervised contrastive loss over the 2B concatenated rows, exp(cos / 0.2) summed
                under label masks.
              Two choices align it with csrv2's definitions (neither changes its cost): the AuxK
              reconstruction leaves out pre_bias (the official target adds pre_bias back, so the term is
              the same), and AuxK is exactly 0 when no latent is dead. The official dead mask comes from
              the stats after the current call's update, so a latent that fires in the batch is not dead
              for its AuxK; for the first-step check both sides start from the same explicit mask.

Before timing, the script checks that both give the same total loss on the first step (exit 1 if not).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import csrv2.kernels
import csrv2.objective
from csrv2.config import HeadConfig, TrainConfig, resolve_k_init, resolve_temperature
from csrv2.data.training import TrainingData
from csrv2.head import SparseHead
from csrv2.objective import step_losses
from csrv2.schedule import k_at_step
from csrv2.trainer import Trainer, tf32_matmuls

FIRE_EPS = 1e-5  # the official top_k counts a latent as fired when its top-k value exceeds this
TOLERANCE = 1e-4  # first-step total loss: |ours - official| <= TOLERANCE * max(1, |official|)
TF32_TOLERANCE = 1e-3  # the same with our products in TF32 (TF32 products land near 3e-4 relative)


# --- the official recipe's step, re-implemented ----------------------------------------------------
def official_pass(head, x, k, k_aux, stats, threshold, dead=None):
    """One official forward pass at k. x: (B, d); stats: (h,) long, top-k calls since each latent fired.

    Returns z (B, h) dense codes, x_hat (B, d), residual_hat (B, d) from the AuxK latents, the updated
    stats and the dead mask used (h,) bool: stats > threshold after this call's update. A given `dead`
    replaces the stats before the update: latents that fire in this call are then dropped from it.
    """
    w = head.encoder.weight  # (h, d)
    pre = F.linear(x - head.pre_bias, w, head.latent_bias)  # (B, h): full GEMM
    top = pre.topk(min(k, pre.shape[1]), dim=-1)  # (B, k)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values).relu()  # (B, h), zero-filled
    fired = torch.zeros_like(stats).scatter_add(0, top.indices.reshape(-1), (top.values > FIRE_EPS).long().reshape(-1))
    stats = stats * (1 - fired.clamp(max=1)) + 1
    dead = stats > threshold if dead is None else dead & (fired == 0)
    aux = (pre * dead).topk(k_aux, dim=-1)  # (B, k_aux); masks a copy, pre itself is untouched
    z_aux = torch.zeros_like(pre).scatter(-1, aux.indices, aux.values).relu()  # (B, h)
    x_hat = z @ w + head.pre_bias  # (B, h) x (h, d): dense decode
    residual_hat = z_aux @ w  # (B, d); no pre_bias, which the official target adds back
    return z, x_hat, residual_hat, stats, dead


def label_contrastive(z1, z2, labels, temperature):
    """Official supervised contrastive loss. z1, z2: (B, h) the two views; labels: (B,)."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)  # (2B, h)
    sim = torch.exp(z @ z.T / temperature)  # (2B, 2B)
    lab = torch.cat([labels, labels])  # (2B,)
    same = (lab[:, None] == lab[None, :]).float()
    pos = (sim * (same - torch.eye(len(lab), device=z.device))).sum(1).clamp_min(1e-8)
    neg = (sim * (1 - same)).sum(1).clamp_min(1e-8)
    return -torch.log(pos / (pos + neg)).mean()


def official_losses(head, x, k, stats, labels, cfg, dead=None):
    """The official objective on one batch: three passes (k, 4k, k). Returns (losses dict, new stats)."""
    k_aux, threshold, h = head.config.k_aux, head.config.dead_threshold, head.config.hidden_dim
    z1, x_hat_k, res_hat, stats, dead1 = official_pass(head, x, k, k_aux, stats, threshold, dead)
    _, x_hat_4k, _, stats, _ = official_pass(head, x, min(4 * k, h), k_aux, stats, threshold, dead)
    z3, _, _, stats, _ = official_pass(head, x, k, k_aux, stats, threshold, dead)
    residual = x - x_hat_k.detach()  # (B, d)
    baseline = F.mse_loss(residual.mean(0, keepdim=True).expand_as(residual), residual)
    losses = {
        "loss_k": F.mse_loss(x_hat_k, x),
        "loss_4k": F.mse_loss(x_hat_4k, x),
        "loss_aux": (F.mse_loss(res_hat, residual) / baseline).nan_to_num(0) * dead1.any(),
        "loss_cl": label_contrastive(z1, z3, labels, resolve_temperature(cfg.temperature, "supervised", k)),
    }
    losses["loss"] = (losses["loss_k"] + cfg.multi_k_coef * losses["loss_4k"] + cfg.aux_coef * losses["loss_aux"]
                      + cfg.cl_coef * losses["loss_cl"])
    return losses, stats


# --- the two training loops' state and step ---------------------------------------------------
class Official:
    """The official loop: its own copy of the model, plain Adam, the dead stats; Trainer's step interface."""

    def __init__(self, head, stats, cfg):
        self.head, self.stats, self.cfg = copy.deepcopy(head), stats.clone(), cfg
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.lr, eps=cfg.adam_eps)

    def train_step(self, x, labels, k):
        losses, self.stats = official_losses(self.head, x, k, self.stats, labels, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()

    def dead_fraction(self):
        return (self.stats > self.head.config.dead_threshold).float().mean().item()


def our_trainer(head, counters, cfg, x, labels):
    """csrv2's own Trainer (its optimizer, step_losses, counter update), started from head and counters."""
    data = TrainingData(x[:1].cpu().numpy(), labels[:1].cpu().numpy())  # read only for the mode; batches come from us
    trainer = Trainer(head.config, cfg, data, progress=False)
    trainer.head.load_state_dict(head.state_dict())
    trainer.counters = counters.clone()
    return trainer


def make_problem(d, h, k, k_aux, n, classes, dead_fraction, seed, device):
    """A seeded head, n L2-normalised clustered embeddings (n, d) with labels (n,), a dead mask (h,)."""
    g = torch.Generator().manual_seed(seed)
    head = SparseHead(HeadConfig(d, h, k, k_aux), g).to(device)
    centres = F.normalize(torch.randn(classes, d, generator=g), dim=1)  # (classes, d)
    labels = torch.randint(classes, (n,), generator=g)
    x = F.normalize(centres[labels] + torch.randn(n, d, generator=g) / d**0.5, dim=1)  # (n, d)
    dead = torch.zeros(h, dtype=torch.bool)
    dead[torch.randperm(h, generator=g)[: round(dead_fraction * h)]] = True
    return head, x.to(device), labels.to(device), dead.to(device)


def sync(device):
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def steps(loop, x, labels, ks, batch):
    """len(ks) optimizer steps of loop at k = ks[t], cycling over the batches of x; yields what each step returns."""
    batches = len(x) // batch
    for t, k in enumerate(ks):
        rows = slice((t % batches) * batch, (t % batches + 1) * batch)
        yield loop.train_step(x[rows], labels[rows], k)


def run_schedule(loop, x, labels, ks, batch, device):
    """The steps of `steps`, timed: returns seconds."""
    sync(device)
    start = time.perf_counter()
    for _ in steps(loop, x, labels, ks, batch):
        pass
    sync(device)
    return time.perf_counter() - start


def trajectory(loop, x, labels, ks, batch) -> torch.Tensor:
    """(len(ks),) total loss of each of our steps, read back once at the end."""
    return torch.stack([losses["loss"].detach() for losses in steps(loop, x, labels, ks, batch)]).cpu()


def host_syncs(loop, x, labels, k) -> str:
    """'none', or the first host synchronisation one of our CUDA steps makes (torch's sync debug mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop.train_step(x, labels, k)
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def gemm_floor(d, h, b, device, tf32, repeats=10) -> float:
    """Milliseconds of one encoder product (b, d) x (d, h) and its weight gradient, the least a step does."""
    x, w = torch.randn(b, d, device=device), torch.randn(h, d, device=device, requires_grad=True)
    grad = torch.randn(b, h, device=device)
    with tf32_matmuls(tf32):
        for _ in range(3):
            torch.autograd.grad(F.linear(x, w), w, grad)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.autograd.grad(F.linear(x, w), w, grad)
        sync(device)
    return 1e3 * (time.perf_counter() - start) / repeats


def profile(loop, x, labels, ks, batch, rows=15) -> str:
    """The torch profiler's table of the device kernels of len(ks) of our steps, most time first."""
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_schedule(loop, x, labels, ks, batch, x.device)
    events = prof.key_averages()
    try:
        return events.table(sort_by="self_device_time_total", row_limit=rows)
    except (AttributeError, KeyError, ValueError):  # torch before the device_* names
        return events.table(sort_by="self_cuda_time_total", row_limit=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dim", type=int, default=384)
    p.add_argument("--hidden-dim", type=int, default=1536)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--k-aux", type=int, default=None, help="default hidden_dim // 16")
    p.add_argument("--steps", type=int, default=200, help="length of the timed k-annealing schedule")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each first, on throwaway copies")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (interleaved); the median is reported")
    p.add_argument("--no-anneal", action="store_true", help="fixed k instead of k-annealing")
    p.add_argument("--dead-fraction", type=float, default=0.3, help="latents dead at step 0")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...; synchronised before each clock read")
    p.add_argument("--no-tf32", action="store_true", help="our step in full float32 on CUDA (TrainConfig.tf32 off)")
    p.add_argument("--gather-limit", type=int, help="this device's csrv2.objective.GATHER_LIMITS entry for the run: "
                   "codes with over hidden_dim / N non-zeros are zero-filled")
    p.add_argument("--no-compiled", action="store_true", help="CPU: our step through autograd, without the compiled "
                   "backward of csrv2.kernels (which needs numba)")
    p.add_argument("--profile", action="store_true", help="CUDA: also print the kernels of 5 of our steps, most time first")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    csrv2.kernels.ENABLED = not a.no_compiled
    if a.gather_limit:
        csrv2.objective.GATHER_LIMITS[device.type] = a.gather_limit
    d, h, b = a.input_dim, a.hidden_dim, a.batch_size
    k_aux = a.k_aux or max(1, h // 16)
    cfg = TrainConfig(batch_size=b, anneal=not a.no_anneal, contrastive="supervised", seed=a.seed, device=str(device),
                      tf32=not a.no_tf32)
    # fresh batches as in real training (one pass), capped so that the paper's sizes fit on a GPU
    n = min(a.steps * b, max(8 * b, 2**16))
    head, x, labels, dead = make_problem(d, h, a.k, k_aux, n, a.classes, a.dead_fraction, a.seed, device)
    k_init = resolve_k_init(None, a.k, h) if cfg.anneal else a.k
    ks = [k_at_step(t, a.steps, k_init, a.k, cfg.decay_ratio) for t in range(a.steps)]
    print(f"d={d} h={h} batch={b} k={a.k} k_aux={k_aux} steps={a.steps} k: {ks[0]} -> {ks[-1]} "
          f"dead at start {dead.float().mean():.0%} device={device} threads={torch.get_num_threads()} "
          f"compiled backward={csrv2.kernels.available(device)}")

    # First step, same weights, data and dead mask: the totals must agree.
    ours, _ = step_losses(head, x[:b], ks[0], dead, cfg, "supervised", labels[:b])
    stats0 = torch.zeros(h, dtype=torch.long, device=device)
    official, _ = official_losses(copy.deepcopy(head), x[:b], ks[0], stats0, labels[:b], cfg, dead=dead)
    diff = abs(ours["loss"].item() - official["loss"].item())
    ok = diff <= TOLERANCE * max(1.0, abs(official["loss"].item()))
    for name in ("loss", "loss_k", "loss_4k", "loss_aux", "loss_cl"):
        print(f"first-step {name:8s} ours {ours[name].item():.7f}  official {official[name].item():.7f}")
    print(f"first-step total loss |diff| {diff:.2e}: {'OK' if ok else 'MISMATCH'}")
    if not ok:
        sys.exit(1)
    cuda, tf32_diff = device.type == "cuda", None
    if cuda and cfg.tf32:  # the check above ran in float32; the timed step runs its products in TF32
        with tf32_matmuls(True):
            fast, _ = step_losses(head, x[:b], ks[0], dead, cfg, "supervised", labels[:b])
        tf32_diff = abs(fast["loss"].item() - official["loss"].item()) / max(1.0, abs(official["loss"].item()))
        print(f"first-step total loss, ours in TF32: {fast['loss'].item():.7f}, relative diff {tf32_diff:.2e}: "
              f"{'OK' if tf32_diff <= TF32_TOLERANCE else 'MISMATCH'}")
        if tf32_diff > TF32_TOLERANCE:
            sys.exit(1)

    # Both start with the same latents dead (counters just past the threshold there).
    state0 = torch.where(dead, head.config.dead_threshold + 1, 0).long()
    make = {"ours": lambda: our_trainer(head, state0, cfg, x, labels), "official": lambda: Official(head, state0, cfg)}
    for new_loop in make.values():
        run_schedule(new_loop(), x, labels, ks[: a.warmup], b, device)
    seconds, dead_end = {name: [] for name in make}, {}
    for _ in range(a.repeats):
        for name, new_loop in make.items():
            loop = new_loop()
            seconds[name].append(run_schedule(loop, x, labels, ks, b, device))
            dead_end[name] = loop.dead_fraction()
    rate = {name: a.steps * b / statistics.median(s) for name, s in seconds.items()}
    extra = {}
    if cuda:
        extra["host_syncs"] = host_syncs(make["ours"](), x[:b], labels[:b], ks[0])
        extra["gemm_floor_ms"] = {"fp32": gemm_floor(d, h, b, device, False), "tf32": gemm_floor(d, h, b, device, True)}
        if cfg.tf32:  # the whole schedule in TF32 against float32, step for step
            exact = trajectory(our_trainer(head, state0, TrainConfig(**{**cfg.to_dict(), "tf32": False}), x, labels), x, labels, ks, b)
            fast = trajectory(make["ours"](), x, labels, ks, b)
            extra["tf32_max_relative_loss_diff"] = float(((fast - exact).abs() / exact.abs().clamp_min(1.0)).max())
        if a.profile:
            print(profile(make["ours"](), x, labels, ks[:5], b))
    ratio = rate["ours"] / rate["official"]

    print(f"\n{'':9s}{'samples/s':>11s}{'ms/step':>9s}{'dead at end':>13s}")
    for name in make:
        print(f"{name:9s}{rate[name]:11.0f}{1e3 * b / rate[name]:9.2f}{dead_end[name]:13.1%}")
    print("(dead: csrv2 counts optimizer steps without a top-k firing; official counts top-k calls, 3 a step)")
    for name, value in extra.items():
        print(f"{name}: {value}")
    if cuda:
        ms = 1e3 * b / rate["ours"]
        print(f"ours {ms:.2f} ms/step = {ms / extra['gemm_floor_ms']['fp32']:.2f} x the float32 GEMM floor")
    print(f"\nours: {rate['ours']:.0f} samples/s  official: {rate['official']:.0f} samples/s  ratio: {ratio:.2f}")
    if a.json:
        record = {"args": vars(a), "k_aux": k_aux, "k_schedule": [ks[0], ks[-1]], "device": str(device),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "compiled_backward": csrv2.kernels.available(device),
                  "first_step_loss": {"ours": ours["loss"].item(), "official": official["loss"].item()},
                  "seconds": seconds, "samples_per_s": rate, "ratio": ratio, "dead_at_end": dead_end,
                  "first_step_tf32_relative_diff": tf32_diff, **extra}
        with open(a.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
