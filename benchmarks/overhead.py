"""Overhead of the diagnostics on a training loop: bare vs LossDiagnostics() vs Lightning's grad_norm recipe.

Rows: bare; ``LossDiagnostics()`` (defaults); ``LossDiagnostics(on_nonfinite="warn")`` (no per-step NaN guard);
with ``--activations`` also ``LossDiagnostics(activations=False)``; Lightning's recipe.

Trains the same MLP (10 hidden layers of 256, batch 256, synthetic regression data made here) the same number of
steps in each configuration, with the same seeds, and prints a markdown table of median wall-clock seconds of
``trainer.fit``, the median per-repeat ratio to the bare run and a 90 % bootstrap interval of that median (how much
of a difference is noise on a shared machine).

Interleaving: by default every repeat runs all configurations at once, one ``trainer.fit`` per process (in its main
thread, as in a training script), and only one runs at a time: each hands the machine to the next every
``--block-steps`` optimizer steps (default 10). A configuration's time is the sum of its turns (fit start and end
included), so all of them share the same seconds of a shared machine whose speed drifts by 10 % or more between whole
fits. The first step of a turn finds cold caches (3-6 ms more than the 17-23 ms of a step here, measured the same
for bare and LossDiagnostics()). ``--block-steps 0`` runs whole fits one after the other instead.

    python benchmarks/overhead.py --repeats 5 --steps 300
    python benchmarks/overhead.py --device cuda --activations
    python benchmarks/overhead.py --fused-adam  # every configuration with Adam(fused=True)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import multiprocessing
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _turns import Relay  # benchmarks/_turns.py, beside this script
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IN_FEATURES = 64


class MLP(LightningModule):
    def __init__(self, width: int, layers: int, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [nn.Linear(IN_FEATURES if i == 0 else width, width), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        preds = self.net(x).squeeze(-1)
        loss = nn.functional.mse_loss(preds, y)
        return {"loss": loss, "preds": preds.detach(), "target": y}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused or None)


class GradNormRecipe(MLP):
    """Lightning's documented recipe: log `grad_norm(self, norm_type=2)` in `on_before_optimizer_step`."""

    def on_before_optimizer_step(self, optimizer):
        self.log_dict(grad_norm(self, norm_type=2))


def make_data(steps: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, IN_FEATURES, generator=g)
    w = torch.randn(IN_FEATURES, generator=g)
    y = torch.tanh(x @ w / 8) + 0.1 * torch.randn(steps * batch, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def diagnostics_factories(with_activations: bool) -> tuple[dict[str, Callable[[], list[Callback]]], list[str]]:
    """Rows that use the package: LossDiagnostics() (or the three monitors if it does not import)."""
    notes: list[str] = []
    rows: dict[str, Callable[[], list[Callback]]] = {}
    try:
        from lightning_lossdiag import LossDiagnostics

        LossDiagnostics()
        rows["LossDiagnostics()"] = lambda: [LossDiagnostics()]
        default_acts = inspect.signature(LossDiagnostics).parameters.get("activations")
        has_acts = default_acts is not None
    except Exception as err:  # noqa: BLE001 - any failure: fall back and say so
        from lightning_lossdiag.callbacks.gradient_monitor import GradientMonitor
        from lightning_lossdiag.callbacks.loss_monitor import LossMonitor
        from lightning_lossdiag.callbacks.scheduler_monitor import SchedulerMonitor

        notes.append(f"LossDiagnostics did not import ({type(err).__name__}: {err}); used the three monitors.")
        rows["LossMonitor + GradientMonitor + SchedulerMonitor"] = lambda: [
            LossMonitor(),
            GradientMonitor(),
            SchedulerMonitor(),
        ]
        LossDiagnostics, has_acts, default_acts = None, False, None  # type: ignore[assignment]
    if LossDiagnostics is not None and "on_nonfinite" in inspect.signature(LossDiagnostics).parameters:
        rows["LossDiagnostics(on_nonfinite='warn')"] = lambda: [LossDiagnostics(on_nonfinite="warn")]
        notes.append("on_nonfinite='warn' drops the per-step NaN guard of the default 'skip': its row shows the price.")
    if with_activations:
        try:
            from lightning_lossdiag import ActivationMonitor
        except Exception as err:  # noqa: BLE001
            notes.append(f"--activations: ActivationMonitor did not import ({type(err).__name__}: {err}); row skipped.")
        else:
            if LossDiagnostics is not None and has_acts and default_acts.default not in (False, None):
                notes.append("LossDiagnostics() already monitors activations; the extra row turns them off.")
                rows["LossDiagnostics(activations=False)"] = lambda: [LossDiagnostics(activations=False)]
            elif LossDiagnostics is not None and has_acts:
                rows["LossDiagnostics + activations"] = lambda: [LossDiagnostics(activations=True)]
            else:
                base = rows[next(iter(rows))]
                rows["LossDiagnostics + activations"] = lambda: [*base(), ActivationMonitor()]
    return rows, notes


class Turns(Callback):
    """Every ``every`` optimizer steps (after that batch, its flush included) hand the machine to the next process."""

    def __init__(self, relay: Relay, index: int, every: int) -> None:
        self.relay, self.index, self.every = relay, index, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step % self.every == 0 and trainer.global_step < trainer.max_steps:
            self.relay.give(self.index)
            self.relay.take(self.index)


def make_trainer(callbacks: list[Callback], args: argparse.Namespace, root: str) -> Trainer:
    return Trainer(
        max_steps=args.steps,
        max_epochs=1,
        limit_val_batches=0,
        accelerator=args.device,
        devices=1,
        logger=TensorBoardLogger(root, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_lossdiag"):
        __import__("logging").getLogger(name).setLevel("ERROR")


def config_table(
    args: argparse.Namespace,
) -> tuple[dict[str, tuple[type[MLP], Callable[[], list[Callback]]]], list[str]]:
    """Every configuration by name: its model class and a factory of its callbacks."""
    configs: dict[str, tuple[type[MLP], Callable[[], list[Callback]]]] = {"bare": (MLP, list)}
    rows, notes = diagnostics_factories(args.activations)
    configs.update({name: (MLP, factory) for name, factory in rows.items()})
    configs["grad_norm recipe (self.log_dict)"] = (GradNormRecipe, list)
    return configs, notes


def turn_worker(
    name: str, index: int, args: argparse.Namespace, seed: int, relay: Relay, ready: Any, errors: Any
) -> None:
    """One configuration in its own process: warm up, wait for the others, then fit in turns."""
    quiet()
    try:
        model_cls, factory = config_table(args)[0][name]
        run_once(model_cls, factory(), argparse.Namespace(**{**vars(args), "steps": 10}), seed=0)  # first-call costs
        seed_everything(seed, workers=True, verbose=False)
        model = model_cls(args.width, args.layers, args.fused_adam)
        data = make_data(args.steps, args.batch)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer([*factory(), Turns(relay, index, args.block_steps)], args, tmp)
            ready.wait()
            relay.take(index)
            try:
                trainer.fit(model, data)
                if args.device == "cuda":
                    torch.cuda.synchronize()
            finally:
                relay.give(index, finished=True)
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        errors.put(f"{name}: {type(err).__name__}: {err}")
        ready.abort()


def run_interleaved(names: list[str], args: argparse.Namespace, seed: int, first: int) -> list[tuple[float, float]]:
    """All configurations, one process each, in turns of ``args.block_steps`` steps: (wall s, CPU s) of each fit.

    Each fit runs in the main thread of its own process, as a training script does; only one process runs at a time.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lightning.pytorch", "lightning_lossdiag"])
    relay = Relay(ctx, len(names))
    ready = ctx.Barrier(len(names) + 1)
    errors = ctx.Queue()
    procs = [
        ctx.Process(target=turn_worker, args=(name, i, args, seed, relay, ready, errors))
        for i, name in enumerate(names)
    ]
    for proc in procs:
        proc.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # broken: a child failed; it reports below
        ready.wait()  # every child has warmed up and built its Trainer
    relay.turns[first].set()
    for proc in procs:
        proc.join()
    if not errors.empty():
        raise RuntimeError(errors.get())
    return [(relay.wall[i], relay.cpu[i]) for i in range(len(names))]


def run_once(
    model_cls: type[MLP], callbacks: list[Callback], args: argparse.Namespace, seed: int
) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``trainer.fit``."""
    seed_everything(seed, workers=True, verbose=False)
    model = model_cls(args.width, args.layers, args.fused_adam)
    data = make_data(args.steps, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(callbacks, args, tmp)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, data)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--activations", action="store_true", help="add a row with activation monitoring toggled")
    parser.add_argument(
        "--fused-adam",
        action="store_true",
        help="every configuration trains with Adam(fused=True) (the NaN guard then needs no pass over the gradients)",
    )
    parser.add_argument(
        "--block-steps",
        type=int,
        default=10,
        help="steps per turn when the configurations take turns, one process each (0: whole fits one after the other)",
    )
    args = parser.parse_args(argv)
    quiet()
    configs, notes = config_table(args)
    names = list(configs)
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    if args.block_steps <= 0:
        for model_cls, factory in configs.values():  # warm-up: imports, allocator, first-call costs
            run_once(model_cls, factory(), argparse.Namespace(**{**vars(args), "steps": 10}), seed=0)
    for r in range(args.repeats):
        if args.block_steps > 0:  # every configuration in the same seconds, taking turns
            for name, (wall, used) in zip(names, run_interleaved(names, args, r, r % len(names)), strict=True):
                times[name].append(wall)
                cpu[name].append(used)
        else:
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate so no config always runs first
            for name in order:
                model_cls, factory = configs[name]
                wall, used = run_once(model_cls, factory(), args, seed=r)
                times[name].append(wall)
                cpu[name].append(used)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n}={times[n][-1]:.2f}s" for n in names), flush=True)

    def ratio(series: dict[str, list[float]], name: str) -> float:
        return statistics.median(t / b for t, b in zip(series[name], series["bare"], strict=True))

    def interval(name: str) -> str:
        """90 % bootstrap interval of the median per-repeat wall-clock ratio (resampling repeats, fixed seed)."""
        ratios = [t / b for t, b in zip(times[name], times["bare"], strict=True)]
        rng = random.Random(0)
        medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
        return f"{medians[100]:.3f}-{medians[1899]:.3f}"

    print()
    print(f"`{shlex.join([sys.executable, *sys.argv])}`")
    print()
    print(f"{args.steps} steps, batch {args.batch}, MLP {args.layers}x{args.width}, device {args.device}, "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}, "
          + (f"turns of {args.block_steps} steps" if args.block_steps > 0 else "whole fits in turn")
          + (", Adam(fused=True)" if args.fused_adam else ""))  # fmt: skip
    print()
    columns = ["configuration", "median s", "median ratio to bare", "90 % interval", "min s", "ratio of mins"]
    print("| " + " | ".join([*columns, "median CPU ratio"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        print(
            f"| {name} | {statistics.median(times[name]):.3f} | {ratio(times, name):.3f}x | {interval(name)} "
            f"| {min(times[name]):.3f} | {min(times[name]) / min(times['bare']):.3f}x | {ratio(cpu, name):.3f}x |"
        )
    if args.block_steps > 0:
        print(f"\nRatios are per repeat: all configurations ran in the same seconds, {args.block_steps} steps a turn.")
        print("CPU: the process's CPU time in its turns.")
    else:
        print("\nRatios are per repeat (same seed, adjacent whole fits). CPU: the process's CPU time.")
    print("The interval is a 90 % bootstrap interval of the median ratio over repeats: it shows how much of a")
    print("difference is noise on a shared machine.")
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
