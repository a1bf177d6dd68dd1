"""Overhead of the diagnostics on a training loop: bare vs LossDiagnostics() vs Lightning's grad_norm recipe.

Rows: bare; ``LossDiagnostics()`` (defaults); ``LossDiagnostics(on_nonfinite="warn")`` (no per-step NaN guard);
with ``--activations`` also ``LossDiagnostics(activations=False)``; Lightning's recipe.

Trains the same MLP (10 hidden layers of 256, batch 256, synthetic regression data made here) the same number of
steps in each configuration, with the same seeds, and prints a markdown table of median wall-clock seconds of
``trainer.fit``, the median per-repeat ratio to the bare run and a 90 % bootstrap interval of that median (how much
of a difference is noise on a shared machine).

Interleaving: by default every repeat runs all configurations at once, one ``trainer.fit`` per thread, and only one
thread runs at a time: each hands the machine to the next every ``--block-steps`` optimizer steps (default 10). A
configuration's time is the sum of its turns (fit start and end included), so all of them share the same seconds of
a shared machine whose speed drifts by 10 % or more between whole fits. The first step of a turn finds cold caches
(about 3 ms here, the same for every configuration). ``--block-steps 0`` runs whole fits one after the other.

    python benchmarks/overhead.py --repeats 5 --steps 300
    python benchmarks/overhead.py --device cuda --activations
"""

from __future__ import annotations

import argparse
import inspect
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IN_FEATURES = 64


class MLP(LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
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
        return torch.optim.Adam(self.parameters(), lr=1e-3)


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


class Relay:
    """One turn at a time between threads, cyclic; sums each thread's wall-clock and thread-CPU time in its turns."""

    def __init__(self, n: int) -> None:
        self.turns = [threading.Event() for _ in range(n)]
        self.finished = [False] * n
        self.wall = [0.0] * n
        self.cpu = [0.0] * n
        self._since = [(0.0, 0.0)] * n

    def take(self, i: int) -> None:
        """Wait for thread ``i``'s turn, then start its clocks."""
        self.turns[i].wait()
        self.turns[i].clear()
        self._since[i] = (time.perf_counter(), time.thread_time())

    def give(self, i: int, finished: bool = False) -> None:
        """Stop thread ``i``'s clocks and wake the next unfinished thread (``i`` itself if it is the last)."""
        wall, cpu = self._since[i]
        self.wall[i] += time.perf_counter() - wall
        self.cpu[i] += time.thread_time() - cpu
        self.finished[i] = self.finished[i] or finished
        n = len(self.turns)
        nxt = next((k % n for k in range(i + 1, i + 1 + n) if not self.finished[k % n]), None)
        if nxt is not None:
            self.turns[nxt].set()


class Turns(Callback):
    """Every ``every`` optimizer steps (after that batch, its flush included) hand the machine to the next thread."""

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


def run_interleaved(
    configs: list[tuple[type[MLP], list[Callback]]], args: argparse.Namespace, seed: int, first: int
) -> list[tuple[float, float]]:
    """All ``configs`` in threads taking turns of ``args.block_steps`` steps; (wall s, thread-CPU s) of each fit."""
    relay = Relay(len(configs))
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i, (model_cls, callbacks) in enumerate(configs):
            seed_everything(seed, workers=True, verbose=False)
            model = model_cls(args.width, args.layers)
            trainer = make_trainer([*callbacks, Turns(relay, i, args.block_steps)], args, f"{tmp}/{i}")
            runs.append((trainer, model, make_data(args.steps, args.batch)))

        def work(i: int) -> None:
            trainer, model, data = runs[i]
            relay.take(i)
            try:
                trainer.fit(model, data)
                if args.device == "cuda":
                    torch.cuda.synchronize()
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)
            finally:
                relay.give(i, finished=True)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(configs))]
        for t in threads:
            t.start()
        relay.turns[first].set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return list(zip(relay.wall, relay.cpu, strict=True))


def run_once(
    model_cls: type[MLP], callbacks: list[Callback], args: argparse.Namespace, seed: int
) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``trainer.fit``."""
    seed_everything(seed, workers=True, verbose=False)
    model = model_cls(args.width, args.layers)
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
        "--block-steps",
        type=int,
        default=10,
        help="steps per turn when the configurations take turns in threads (0: whole fits one after the other)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_lossdiag"):
        __import__("logging").getLogger(name).setLevel("ERROR")

    configs: dict[str, tuple[type[MLP], Callable[[], list[Callback]]]] = {"bare": (MLP, list)}
    rows, notes = diagnostics_factories(args.activations)
    configs.update({name: (MLP, factory) for name, factory in rows.items()})
    configs["grad_norm recipe (self.log_dict)"] = (GradNormRecipe, list)

    for model_cls, factory in configs.values():  # warm-up: imports, allocator, first-call costs
        run_once(model_cls, factory(), argparse.Namespace(**{**vars(args), "steps": 10}), seed=0)
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.repeats):
        if args.block_steps > 0:  # every configuration in the same minutes, taking turns
            built = [(configs[n][0], configs[n][1]()) for n in names]
            for name, (wall, used) in zip(names, run_interleaved(built, args, r, r % len(names)), strict=True):
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
          + (f"turns of {args.block_steps} steps" if args.block_steps > 0 else "whole fits in turn"))  # fmt: skip
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
        print(f"\nRatios are per repeat: all configurations ran in the same minutes, {args.block_steps} steps a turn.")
        print("CPU: the training thread's CPU time (torch's worker threads are not counted).")
    else:
        print("\nRatios are per repeat (same seed, adjacent whole fits). CPU: the process's CPU time.")
    print("The interval is a 90 % bootstrap interval of the median ratio over repeats: it shows how much of a")
    print("difference is noise on a shared machine.")
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
