"""Outputs at scale: bare Trainer vs the same Trainer with LossDiagnostics() on real-sized classification outputs.

Every workload is a small LightningModule with seeded synthetic data made here; its training_step and
validation_step return ``{"loss": loss, "preds": logits.detach(), "target": y}``, so both configurations run the same
module and only the callbacks differ. Each configuration of each repeat runs in its own process, so one's memory never
leaks into the other's. By default the configurations of a repeat run at once and take turns every ``--turns`` (10)
training steps, only one running at a time (``benchmarks/_turns.py``): they share the same seconds of the machine,
whose speed drifts by 10 % or more between fits run one after the other. The wait for a turn is left out of every
time, and so is the first step after it (cold caches). ``--turns 0`` runs the fits one after the other instead. The
numbers are medians over repeats; the per-step ratio is the median of each repeat's ratio.

Columns: mean wall time per training step within a run, flush steps and batched-count steps included
(``on_train_batch_start`` to the next one, warm-up steps and the steps that cross an epoch end left out; on CUDA
the timer synchronises at the batch boundaries, in both configurations);
the ratio of the diag and bare medians; seconds added per epoch outside the training steps (validation and epoch-end
hooks); peak memory added (CUDA: ``max_memory_allocated``; CPU: peak RSS of the process); bytes of TensorBoard event
files the diag run wrote per stage (train, val) and epoch.

    python benchmarks/scale.py                                  # all workloads, CPU, 1 thread
    python benchmarks/scale.py --quick --repeats 1              # smoke run with tiny sizes
    python benchmarks/scale.py --workloads small,cls3_seq       # the small-class cases: a tiny MLP, a text classifier
    python benchmarks/scale.py --device cuda --precision bf16-mixed --json scale.json
    python benchmarks/scale.py --workloads cls1000,lm32k_btv --steps 100
    python benchmarks/scale.py --workloads lm32k_flat,lm32k_btv --configs bare,diag --live-rss   # memory, steadier
    python benchmarks/scale.py --workloads cls1000,tag1000 --budget 4096     # a smaller sample: cheaper steps

Peak RSS depends on what glibc keeps cached: from one run to the next the same fit's peak moves by tens of MiB.
``--live-rss`` fixes the allocator's mmap threshold in every run (bare and diag alike), so freed buffers go back to
the system and the peak follows the bytes alive; page faults then cost both configurations more time a step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from _turns import TURN_TIMEOUT_S, Relay  # benchmarks/_turns.py, beside this script
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

WORKLOADS = ("small", "cls3_seq", "cls1000", "tag1000", "seg21", "lm32k_flat", "lm32k_btv")
WARMUP = 3  # training steps at the start of each epoch left out of the per-step timing
MARK = " ✗"
TARGETS = {"ratio": 1.10, "epoch_s": 2.0, "mem_mib": 256.0, "events_mib": 5.0}
RESULT = "@@scale-result@@ "


def sizes(quick: bool) -> dict[str, dict[str, int]]:
    """Workload sizes: real ones, or tiny ones for a smoke run (``--quick``)."""
    if quick:
        return {
            "small": {"classes": 5, "batch": 16, "features": 32, "hidden": 64},
            "cls3_seq": {"classes": 3, "batch": 4, "seq": 8, "hidden": 32, "vocab": 100},
            "cls1000": {"classes": 50, "batch": 32, "features": 32, "hidden": 64},
            "tag1000": {"classes": 50, "batch": 32, "features": 32, "hidden": 64},
            "seg21": {"classes": 21, "batch": 2, "side": 16, "hidden": 8},
            "lm": {"classes": 500, "batch": 2, "seq": 16, "hidden": 32},
        }
    return {
        "small": {"classes": 5, "batch": 16, "features": 32, "hidden": 64},
        "cls3_seq": {"classes": 3, "batch": 16, "seq": 32, "hidden": 128, "vocab": 1000},
        "cls1000": {"classes": 1000, "batch": 256, "features": 256, "hidden": 512},
        "tag1000": {"classes": 1000, "batch": 256, "features": 256, "hidden": 512},
        "seg21": {"classes": 21, "batch": 8, "side": 64, "hidden": 32},
        "lm": {"classes": 32000, "batch": 4, "seq": 64, "hidden": 128},
    }


def make_module(name: str, size: dict[str, int], handover: bool = True) -> Any:
    from lightning.pytorch import LightningModule

    class Workload(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            c, h = size["classes"], size["hidden"]
            if name in ("small", "cls1000", "tag1000"):
                self.net = nn.Sequential(nn.Linear(size["features"], h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
                self.head = nn.Linear(h, c)
            elif name == "seg21":
                self.net = nn.Sequential(
                    *(m for i in range(3) for m in (nn.Conv2d(3 if i == 0 else h, h, 3, padding=1), nn.ReLU()))
                )
                self.head = nn.Conv2d(h, c, 1)
            elif name == "cls3_seq":  # a small text classifier: two transformer layers, mean pooling, 3 classes
                self.embed = nn.Embedding(size["vocab"], h)
                layer = nn.TransformerEncoderLayer(h, 4, 4 * h, dropout=0.0, batch_first=True)
                self.net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = nn.Linear(h, c)
            else:
                self.embed = nn.Embedding(c, h)
                self.net = nn.TransformerEncoderLayer(h, 4, 2 * h, dropout=0.0, batch_first=True)
                self.head = nn.Linear(h, c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if name == "cls3_seq":
                return self.head(self.net(self.embed(x)).mean(1))
            if name.startswith("lm"):
                mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
                return self.head(self.net(self.embed(x), src_mask=mask, is_causal=True))
            return self.head(self.net(x))

        def step(self, batch: Any) -> dict[str, torch.Tensor]:
            x, y = batch
            logits = self(x)
            if name == "tag1000":
                loss = F.binary_cross_entropy_with_logits(logits, y)
            elif name == "seg21":
                loss = F.cross_entropy(logits, y, ignore_index=255)
            elif name == "lm32k_flat":
                logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
                loss = F.cross_entropy(logits, y, ignore_index=-100)
            elif name == "lm32k_btv":  # the loss wants the class dim 1; the hand-over stays (B, T, V)
                loss = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100)
            else:
                loss = F.cross_entropy(logits, y)
            if not handover:  # config "loss": LossDiagnostics() sees the loss only (what the hand-over adds shows)
                return {"loss": loss}
            return {"loss": loss, "preds": logits.detach(), "target": y}

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            return self.step(batch)

        def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            return self.step(batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return Workload()


_RULE_SEED = 20261205  # the labelling rule of the synthetic tasks (weights), shared by training and validation


def make_data(name: str, size: dict[str, int], batches: int, seed: int) -> DataLoader:
    """``batches`` batches of seeded synthetic data that the workload can learn from.

    ``seed`` draws the samples; the rule that labels them (the weights below) is the same for every seed, so a
    validation set drawn with another seed poses the same task as the training set.
    """
    g = torch.Generator().manual_seed(seed)
    rule = torch.Generator().manual_seed(_RULE_SEED)
    n, c = batches * size["batch"], size["classes"]
    if name in ("small", "cls1000", "tag1000"):
        x = torch.randn(n, size["features"], generator=g)
        scores = x @ torch.randn(size["features"], c, generator=rule) + 0.5 * torch.randn(n, c, generator=g)
        # tag1000: ~1 % positives (standardized scores above the 99th percentile of N(0, 1)); else the best class
        y = (scores / scores.std() > 2.326).float() if name == "tag1000" else scores.argmax(1)
    elif name == "seg21":
        x = torch.randn(n, 3, size["side"], size["side"], generator=g)
        y = F.conv2d(x, torch.randn(c, 3, 3, 3, generator=rule), padding=1).argmax(1)
        y[torch.rand(y.shape, generator=g) < 0.05] = 255  # void pixels
    elif name == "cls3_seq":  # the class follows from which third of the vocabulary the tokens mostly come from
        x = torch.randint(0, size["vocab"], (n, size["seq"]), generator=g)
        y = (x * c // size["vocab"]).mode(1).values
    else:
        tokens = torch.randint(0, c, (n, size["seq"] + 1), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:].clone()
        y[torch.rand(y.shape, generator=g) < 0.05] = -100
    return DataLoader(TensorDataset(x, y), batch_size=size["batch"], shuffle=False)


def handed_over(name: str, size: dict[str, int]) -> str:
    b, c = size["batch"], size["classes"]
    if name == "seg21":
        return f"({b}, {c}, {size['side']}, {size['side']}) vs ({b}, {size['side']}, {size['side']})"
    if name == "lm32k_flat":
        return f"({b * size['seq']}, {c}) vs ({b * size['seq']},)"
    if name == "lm32k_btv":
        return f"({b}, {size['seq']}, {c}) vs ({b}, {size['seq']})"
    return f"({b}, {c}) vs ({b}, {c})" if name == "tag1000" else f"({b}, {c}) vs ({b},)"


def timers(cuda: bool) -> tuple[Any, Any]:
    """A step timer (first callback) and a tail marker (last callback: its batch end follows every other's)."""
    from lightning.pytorch import Callback

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.outside: list[float] = []  # per epoch: its last step's end to the next epoch's first step / train end
            self.prev: float | None = None
            self.index = 0
            self.tail_end: float | None = None
            self.paused = 0.0  # seconds spent waiting for a turn since the last mark (left out of every time)
            self.skip_next = False  # the first step after a turn finds cold caches: not counted

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.prev, self.index = None, 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            t = now()
            if self.index == 0 and self.tail_end is not None:  # previous epoch: its validation and end hooks
                self.outside.append(t - self.tail_end - self.paused)
                self.tail_end = None
            if self.prev is not None and self.index > WARMUP and not self.skip_next:
                self.steps.append(t - self.prev - self.paused)
            self.prev, self.index, self.paused, self.skip_next = t, self.index + 1, 0.0, False

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.tail_end is not None:
                self.outside.append(now() - self.tail_end - self.paused)

    class Tail(Callback):
        def __init__(self, timer: StepTimer) -> None:
            self.timer = timer

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.timer.tail_end = now()

    timer = StepTimer()
    return timer, Tail(timer)


def turns_callback(timer: Any, relay: Relay, index: int, every: int) -> Any:
    """The last callback: every ``every`` optimizer steps, hand the machine to the next configuration's process.

    The wait is added to ``timer.paused`` (left out of the step and epoch-end times) and the step that follows is not
    counted (cold caches after another process ran).
    """
    from lightning.pytorch import Callback

    class Turns(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step % every == 0:
                start = time.perf_counter()
                relay.give(index)
                relay.take(index)
                timer.paused += time.perf_counter() - start
                timer.skip_next = True

    return Turns()


def child(spec: dict[str, Any], turns: tuple[Relay, int, Any] | None = None) -> dict[str, Any]:
    """One configuration of one workload, in this process: fit, then report times, memory and event bytes.

    ``turns``: ``(relay, index, ready)`` when the configurations of a repeat run at once and take turns.
    """
    import logging

    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    args, name, config = argparse.Namespace(**spec["args"]), spec["workload"], spec["config"]
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel("ERROR")
    seen: dict[str, int] = {}
    warnings.simplefilter("default")
    warnings.showwarning = lambda msg, cat, *a, **k: seen.__setitem__(f"{cat.__name__}: {msg}", 1)
    size = sizes(args.quick)["lm" if name.startswith("lm") else name]
    per_epoch = WARMUP + 1 + math.ceil(args.steps / args.epochs)
    out: dict[str, Any] = {"workload": name, "config": config, "shapes": handed_over(name, size)}
    seed_everything(spec["seed"], verbose=False)
    model = make_module(name, size, handover=config != "loss")
    train = make_data(name, size, per_epoch, seed=spec["seed"])
    val = make_data(name, size, max(args.val_batches, 1), seed=spec["seed"] + 1000)
    timer, tail = timers(cuda)
    callbacks: list[Any] = [timer]
    started = False  # in turns: this process has passed the barrier and taken its first turn
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if config in ("diag", "loss"):
                from lightning_lossdiag import LossDiagnostics

                budget = getattr(args, "budget", None)
                parts = {} if budget is None else {"errors": {"budget": budget}, "metrics": {"budget": budget}}
                callbacks.append(LossDiagnostics(**parts))
            last = [tail] if turns is None else [tail, turns_callback(timer, turns[0], turns[1], args.turns)]
            trainer = Trainer(
                max_epochs=args.epochs,
                limit_val_batches=args.val_batches,
                num_sanity_val_steps=0,
                log_every_n_steps=args.log_every,
                accelerator=args.device,
                devices=1,
                precision=args.precision,
                logger=TensorBoardLogger(tmp, name="", version=""),
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=[*callbacks, *last],
            )
            if turns is None:
                trainer.fit(model, train, val)
            else:
                relay, index, ready = turns
                ready.wait()  # every configuration has built its model and Trainer
                relay.take(index)
                started = True
                try:
                    trainer.fit(model, train, val)
                finally:
                    relay.give(index, finished=True)
        except Exception as err:  # noqa: BLE001 - reported in the workload's row
            if turns is not None and not started:  # failed before its first turn: the others must not wait for it
                turns[2].abort()
                turns[0].give(turns[1], finished=True)
            frames = [f for f in traceback.extract_tb(err.__traceback__) if "lightning_lossdiag" in f.filename]
            where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
            out["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:240]}{where}"
            out["traceback"] = traceback.format_exc()
        out["event_bytes"] = sum(p.stat().st_size for p in Path(tmp).rglob("events.out.tfevents*"))
    out["step_s"] = timer.steps
    out["outside_s"] = timer.outside
    out["peak_bytes"] = (
        torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    out["warnings"] = sorted(seen)
    return out


def run_child(name: str, config: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = json.dumps({"workload": name, "config": config, "seed": seed, "args": vars(args)})
    env = dict(os.environ)
    if args.live_rss:  # glibc hands every freed buffer of 128 KiB or more back: peak RSS follows the live bytes
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])  # type: ignore[no-any-return]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"workload": name, "config": config, "error": f"process exited {proc.returncode}: {tail}"[:300]}


def _turn_worker(spec: dict[str, Any], index: int, relay: Relay, ready: Any, results: Any) -> None:
    """One configuration in its own process, taking turns with the others (see :func:`run_in_turns`)."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the diagnosis each fit prints; the parent prints the table
    try:
        results.put((index, child(spec, (relay, index, ready))))
    except BaseException as err:  # noqa: BLE001 - reported in the workload's row
        ready.abort()
        relay.give(index, finished=True)
        results.put((index, {"workload": spec["workload"], "config": spec["config"], "error": repr(err)[:300]}))


def run_in_turns(name: str, configs: list[str], seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration of one repeat at once, one process each, taking turns every ``args.turns`` steps.

    Only one process runs at a time, and all of them share the same seconds of the machine: its drift, which moves
    fits run one after the other by 10 % or more, cancels out of the ratios. The first configuration to run rotates
    with the repeat.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lightning.pytorch", "lightning_lossdiag"])
    relay = Relay(ctx, len(configs))
    ready = ctx.Barrier(len(configs) + 1)
    results = ctx.Queue()
    specs = [{"workload": name, "config": c, "seed": seed, "args": vars(args)} for c in configs]
    procs = [ctx.Process(target=_turn_worker, args=(spec, i, relay, ready, results)) for i, spec in enumerate(specs)]
    for proc in procs:
        proc.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # broken: a child failed; it reports below
        ready.wait()
    relay.turns[seed % len(configs)].set()
    got = dict(results.get(timeout=TURN_TIMEOUT_S * len(configs)) for _ in procs)
    for proc in procs:
        proc.join()
    return [got[i] for i in range(len(configs))]


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians over repeats of each configuration, and the differences diag - bare."""
    s: dict[str, Any] = {}
    for config, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        s[config] = {
            # the mean step of a run counts the periodic flush and batched-count steps; the median over repeats
            "step_s": med([statistics.fmean(r["step_s"]) for r in ok if r["step_s"]]),
            "outside_s": med([m for r in ok if (m := med(r["outside_s"])) is not None]),
            "peak_bytes": med([r["peak_bytes"] for r in ok]),
            "event_bytes": med([r["event_bytes"] for r in ok]),
            "errors": sorted({r["error"] for r in rs if "error" in r}),
        }
    bare, diag = s["bare"], s["diag"]
    stages = 2 if args.val_batches > 0 else 1

    def diff(key: str) -> float | None:
        return None if bare[key] is None or diag[key] is None else diag[key] - bare[key]

    # per repeat, bare and diag ran side by side (in turns, the same seconds): the median of the paired ratios
    paired = [
        statistics.fmean(d["step_s"]) / statistics.fmean(b["step_s"])
        for b, d in zip(runs["bare"], runs["diag"], strict=True)
        if "error" not in b and "error" not in d and b["step_s"] and d["step_s"]
    ]
    s["ratio"] = med(paired)
    s["ratios"] = paired
    loss = s.get("loss", {})
    s["handover_ms"] = (diag["step_s"] - loss["step_s"]) * 1000 if loss.get("step_s") and diag["step_s"] else None
    s["outside_added_s"] = diff("outside_s")
    s["peak_added_bytes"] = diff("peak_bytes")
    s["events_per_stage_epoch"] = None if diag["event_bytes"] is None else diag["event_bytes"] / (args.epochs * stages)
    warned = {w for r in runs["diag"] for w in r.get("warnings", [])}
    s["diag_only_warnings"] = sorted(warned - {w for r in runs["bare"] for w in r.get("warnings", [])})
    return s


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def cell(value: float | None, fmt: str, limit: float | None = None) -> str:
    if value is None:
        return "-"
    return fmt.format(value) + (MARK if limit is not None and value > limit else "")


def row(name: str, shapes: str, s: dict[str, Any]) -> str:
    errors = s["bare"]["errors"] + [f"diag: {e}" for e in s["diag"]["errors"]]
    if s["ratio"] is None and errors:
        bare = cell(s["bare"]["step_s"] and s["bare"]["step_s"] * 1000, "{:.1f}")
        return f"| {name} | {shapes} | {bare} | failed: {'; '.join(errors)} | | | | | |"
    cells = [
        name,
        shapes,
        cell(s["bare"]["step_s"] and s["bare"]["step_s"] * 1000, "{:.1f}"),
        cell(s["diag"]["step_s"] and s["diag"]["step_s"] * 1000, "{:.1f}"),
        cell(s["ratio"], "{:.3f}x", TARGETS["ratio"]),
        cell(s["handover_ms"], "{:+.2f}"),
        cell(s["outside_added_s"], "{:+.3f}", TARGETS["epoch_s"]),
        cell(s["peak_added_bytes"] and mib(s["peak_added_bytes"]), "{:+.1f}", TARGETS["mem_mib"]),
        cell(s["events_per_stage_epoch"] and mib(s["events_per_stage_epoch"]), "{:.3f}", TARGETS["events_mib"]),
    ]
    if errors:  # some repeats failed: the row is the others'
        cells[-1] += " (failed: " + "; ".join(errors) + ")"
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list from " + ", ".join(WORKLOADS))
    parser.add_argument("--steps", type=int, default=None, help="measured training steps in all (default 100)")
    parser.add_argument("--val-batches", type=int, default=None, help="validation batches per epoch (default 4)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on cpu)")
    parser.add_argument("--precision", default=None, help="Trainer precision, e.g. bf16-mixed (default 32-true)")
    parser.add_argument(
        "--log-every", type=int, default=50, help="the Trainer's log_every_n_steps: flushes and batched counts"
    )
    parser.add_argument(
        "--configs", default="bare,loss,diag", help="configurations run in turn: bare,diag and optionally loss"
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=10,
        help="the configurations of a repeat run at once and take turns every N training steps (same seconds of the "
        "machine); 0: one after the other",
    )
    parser.add_argument(
        "--live-rss",
        action="store_true",
        help="CPU: a fixed glibc mmap threshold in every run (peak RSS follows live bytes, not the allocator cache)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="the class engine's sampled values per step (errors and metrics; default: the package's, 16384)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (and 8 steps, 2 val batches): smoke run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        return
    args.steps = args.steps if args.steps is not None else (8 if args.quick else 100)
    args.val_batches = args.val_batches if args.val_batches is not None else (2 if args.quick else 4)
    args.threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not {"bare", "diag"} <= set(configs) or not set(configs) <= {"bare", "loss", "diag"}:
        parser.error(f"--configs must hold bare and diag, optionally loss; got {args.configs!r}")
    if args.live_rss and args.turns > 0:  # the processes of a repeat fork from a server that reads it at its start
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    import lightning
    import torchmetrics

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    header = [
        f"`{shlex.join([sys.executable, *sys.argv])}`",
        "",
        f"torch {torch.__version__}, lightning {lightning.__version__}, torchmetrics {torchmetrics.__version__}; "
        f"device {device}; torch threads {args.threads or torch.get_num_threads()}; "
        f"precision {args.precision or '32-true'}; {args.epochs} epochs x "
        f"({WARMUP} warm-up + {math.ceil(args.steps / args.epochs)} measured + 1 last) training steps, "
        f"{args.val_batches} val batches per epoch; {args.repeats} repeats ({args.configs}, one process each, "
        + (f"all at once, taking turns every {args.turns} steps)" if args.turns > 0 else "one after the other)")
        + ("; QUICK sizes" if args.quick else "")
        + (f"; budget {args.budget}" if args.budget is not None else ""),
    ]
    print("\n".join(header), flush=True)
    results: dict[str, Any] = {}
    for name in names:
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        for r in range(args.repeats):
            if args.turns > 0:
                start = time.perf_counter()
                for config, out in zip(configs, run_in_turns(name, configs, seed=r, args=args), strict=True):
                    runs[config].append(out)
                status = "; ".join(f"{c} {runs[c][-1].get('error', 'ok')}" for c in configs)
                print(f"  {name} repeat {r + 1}/{args.repeats} in turns: {time.perf_counter() - start:.1f} s, {status}",
                      file=sys.stderr, flush=True)  # fmt: skip
                continue
            for config in configs:
                start = time.perf_counter()
                runs[config].append(run_child(name, config, seed=r, args=args))
                status = runs[config][-1].get("error", "ok")
                print(f"  {name} repeat {r + 1}/{args.repeats} {config}: {time.perf_counter() - start:.1f} s, {status}",
                      file=sys.stderr, flush=True)  # fmt: skip
        shapes = next((x["shapes"] for x in runs["bare"] + runs["diag"] if "shapes" in x), "?")
        results[name] = {"shapes": shapes, "runs": runs, "summary": summarize(runs, args)}
    print()
    print("| workload | preds vs target | bare ms/step | diag ms/step | diag/bare | hand-over ms/step | epoch end +s "
          "| peak mem +MiB | events MiB/stage/epoch |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, res in results.items():
        print(row(name, res["shapes"], res["summary"]))
    memory = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS (ru_maxrss) of the process"
    if args.live_rss and args.device != "cuda":
        memory += ", glibc mmap threshold fixed at 128 KiB"
    print(
        f"\nTargets (cells that miss are marked{MARK}): per step <= {TARGETS['ratio']:.2f}x bare (the median over "
        "repeats of the ratio of the per-step means); "
        f"epoch end <= +{TARGETS['epoch_s']:.0f} s (validation + epoch-end hooks per epoch, diag - bare); "
        f"memory added <= {TARGETS['mem_mib']:.0f} MiB at 32k classes (applied to every row; {memory}, diag - bare); "
        "hand-over = diag minus the same LossDiagnostics() given the loss only (config 'loss'); "
        f"events <= {TARGETS['events_mib']:.0f} MiB per stage and epoch (TensorBoard files of the diag run / "
        "(epochs x stages), stages train and val, or train alone with --val-batches 0)."
    )
    for name, res in results.items():
        for w in res["summary"]["diag_only_warnings"][:5]:
            print(f"\nNote: {name}: diag-only warning: {w[:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "args": vars(args), "results": results}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
