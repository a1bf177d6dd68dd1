"""The diagnostics on a GPU: per-step time from CUDA events, peak memory and kernels per step.

Models (seeded synthetic data made here, nothing downloaded):

- ``mlp``: the MLP of ``overhead.py`` (10 hidden layers of 256, batch 256, regression, fp32, Adam);
- ``lm``: a GPT-like causal LM (pre-norm transformer blocks, d=1024, 16 heads, vocabulary 8,192, sequence 512,
  batch 16), ``bf16-mixed``, AdamW (``foreach``: Lightning refuses norm clipping with a fused optimizer under
  mixed precision), gradient clipping at 1.0, ReduceLROnPlateau on ``train_loss``.

Configurations, fitted one after the other in one process and interleaved across repeats (the order rotates):
``bare``; ``diag`` = ``LossDiagnostics()`` given the loss only; ``handover`` (LM) = ``LossDiagnostics()`` with the
logits handed over (``{"loss", "preds", "target"}``); ``recipe`` = Lightning's ``grad_norm`` recipe; with
``--compile`` also ``bare+compile`` and ``diag+compile`` (the network through ``torch.compile``).

Per-step time: a CUDA event is recorded at every ``on_train_batch_start``; the time of a step is the GPU time between
two events (the host is never made to wait), the first ``--warmup`` steps left out, flush steps included; the table
shows the mean over steps, the median over repeats, and the ratio to ``bare``. Peak memory: ``max_memory_allocated``
of the fit. Kernels per step (``--kernels``): ``torch.profiler`` over non-flush steps, at two depths of the LM, so the
count the package adds can be seen not to grow with the number of parameter tensors.

    python benchmarks/gpu.py --repeats 3 --steps 60 --compile --kernels --json gpu.json
    python benchmarks/gpu.py --models mlp --quick     # a smoke run (CPU too: wall-clock instead of events)
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

TARGETS = {"lm": 1.02, "mlp": 1.05}
MEM_TARGET_MIB = 64.0
FLUSH_EVERY = 50  # log_every_n_steps of every fit


def lm_size(quick: bool, layers: int | None = None) -> dict[str, int]:
    if quick:
        return {"layers": layers or 2, "d": 64, "heads": 4, "vocab": 512, "seq": 32, "batch": 4}
    return {"layers": layers or 12, "d": 1024, "heads": 16, "vocab": 8192, "seq": 512, "batch": 16}


def make_module(model: str, config: str, quick: bool, layers: int | None = None) -> Any:
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities import grad_norm

    handover = config == "handover"
    compiled = config.endswith("+compile")

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if model == "mlp":
                blocks: list[nn.Module] = []
                for i in range(10):
                    blocks += [nn.Linear(64 if i == 0 else 256, 256), nn.ReLU()]
                self.net: nn.Module = nn.Sequential(*blocks, nn.Linear(256, 1))
            else:
                s = lm_size(quick, layers)
                self.embed = nn.Embedding(s["vocab"], s["d"])
                self.pos = nn.Parameter(torch.zeros(s["seq"], s["d"]))
                block = nn.TransformerEncoderLayer(
                    s["d"], s["heads"], 4 * s["d"], dropout=0.0, activation="gelu", batch_first=True, norm_first=True
                )
                self.net = nn.TransformerEncoder(block, s["layers"], enable_nested_tensor=False)
                self.norm = nn.LayerNorm(s["d"])
                self.head = nn.Linear(s["d"], s["vocab"], bias=False)
            if compiled:
                self.net = torch.compile(self.net)  # type: ignore[assignment]

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            if model == "mlp":
                preds = self.net(x).squeeze(-1)
                return {"loss": F.mse_loss(preds, y)}
            t = x.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
            h = self.net(self.embed(x) + self.pos[:t], mask=mask, is_causal=True)
            logits = self.head(self.norm(h))
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            self.log("train_loss", loss)
            if handover:
                return {"loss": loss, "preds": logits.detach(), "target": y}
            return {"loss": loss}

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            if config == "recipe":
                self.log_dict(grad_norm(self, norm_type=2))

        def configure_optimizers(self) -> Any:
            fused = self.device.type == "cuda"
            if model == "mlp":
                return torch.optim.Adam(self.parameters(), lr=1e-3, fused=fused or None)
            # fused=True: Lightning's MixedPrecision refuses gradient clipping with an optimizer that unscales
            opt = torch.optim.AdamW(self.parameters(), lr=3e-4, foreach=True)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}

    return Net()


def make_data(model: str, steps: int, quick: bool, layers: int | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if model == "mlp":
        batch = 256
        x = torch.randn(steps * batch, 64, generator=g)
        y = x @ torch.randn(64, generator=g) + 0.1 * torch.randn(steps * batch, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=batch)
    s = lm_size(quick, layers)
    tokens = torch.randint(0, s["vocab"], (steps * s["batch"], s["seq"] + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=s["batch"])


class StepEvents:
    """A callback recording a CUDA event (or, on the CPU, the wall clock) at every training batch start."""

    def __new__(cls, cuda: bool) -> Any:
        from lightning.pytorch import Callback

        class _Events(Callback):
            def __init__(self) -> None:
                self.marks: list[Any] = []

            def _mark(self) -> None:
                if cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    self.marks.append(event)
                else:
                    self.marks.append(time.perf_counter())

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                self._mark()

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                self._mark()

            def step_ms(self, warmup: int) -> list[float]:
                if cuda:
                    torch.cuda.synchronize()
                    pairs = zip(self.marks[warmup:-1], self.marks[warmup + 1 :], strict=True)
                    return [a.elapsed_time(b) for a, b in pairs]
                return [1000 * (b - a) for a, b in zip(self.marks[warmup:-1], self.marks[warmup + 1 :], strict=True)]

        return _Events()


def trainer_for(args: argparse.Namespace, model: str, callbacks: list[Any], logdir: str, steps: int) -> Any:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    return Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=steps,
        max_epochs=1,
        precision="bf16-mixed" if model == "lm" and args.device == "cuda" else "32-true",
        gradient_clip_val=1.0 if model == "lm" else None,
        log_every_n_steps=FLUSH_EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(logdir, name="", version=""),
        callbacks=callbacks,
    )


def diag_callbacks(config: str) -> list[Any]:
    from lightning_lossdiag import LossDiagnostics

    return [LossDiagnostics()] if config.startswith(("diag", "handover")) else []


def fit_once(args: argparse.Namespace, model: str, config: str, steps: int | None = None) -> dict[str, Any]:
    """One fit of one configuration: mean step time (ms) and peak memory (MiB)."""
    from lightning.pytorch import seed_everything

    cuda = args.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seed_everything(0, verbose=False)
    events = StepEvents(cuda)
    with tempfile.TemporaryDirectory() as tmp:
        steps = steps or args.steps
        trainer = trainer_for(args, model, [events, *diag_callbacks(config)], tmp, steps)
        trainer.fit(make_module(model, config, args.quick), make_data(model, steps, args.quick))
    times = events.step_ms(args.warmup)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return {"ms": statistics.fmean(times), "median_ms": statistics.median(times), "peak_mib": peak}


def kernels_per_step(args: argparse.Namespace, config: str, layers: int) -> tuple[float, collections.Counter[str]]:
    """Device kernels (and copies/memsets) per non-flush training step of the LM, counted by ``torch.profiler``."""
    from lightning.pytorch import Callback, seed_everything
    from torch.profiler import ProfilerActivity, profile

    first, count = 20, 10  # steps 20-29: no flush (every 50), past the first steps' one-time work
    cuda = args.device == "cuda"  # on the CPU (a smoke run) the profiler counts CPU ops instead
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU

    class Window(Callback):
        def __init__(self) -> None:
            self.prof: Any = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == first:
                sync()
                self.prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
                self.prof.__enter__()
            elif trainer.global_step == first + count and self.prof is not None:
                sync()
                self.prof.__exit__(None, None, None)

    seed_everything(0, verbose=False)
    window = Window()
    steps = first + count + 2
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args, "lm", [window, *diag_callbacks(config)], tmp, steps)
        trainer.fit(make_module("lm", config, args.quick, layers), make_data("lm", steps, args.quick, layers))
    names: collections.Counter[str] = collections.Counter()
    busy_us = 0.0
    for event in window.prof.events():
        if event.device_type == kind:
            names[event.name] += 1
            busy_us += event.time_range.elapsed_us()
    names["__busy_us__"] = int(busy_us)
    return sum(names.values()) / count, names


PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def hook_times(args: argparse.Namespace, model: str, config: str) -> dict[str, float]:
    """Host milliseconds per training step spent in each part's per-step hooks (flush steps included)."""
    from lightning.pytorch import seed_everything

    from lightning_lossdiag import LossDiagnostics

    diag = LossDiagnostics()
    totals: collections.Counter[str] = collections.Counter()

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[name] += time.perf_counter() - start

        return wrapper

    for part_name, part in diag.parts.items():
        for hook in PER_STEP_HOOKS:
            if hook in diag._dispatch and any(getattr(f, "__self__", None) is part for f in diag._dispatch[hook]):
                setattr(part, hook, timed(f"{part_name}.{hook}", getattr(part, hook)))
    diag._build_dispatch()
    seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args, model, [diag], tmp, args.steps)
        trainer.fit(make_module(model, config, args.quick), make_data(model, args.steps, args.quick))
    return {k: 1000 * v / args.steps for k, v in totals.most_common()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"device": args.device, "versions": versions(args.device), "models": {}}
    for model in args.models:
        configs = ["bare", "diag", "recipe"] + (["handover"] if model == "lm" else [])
        if args.compile and model == "mlp":
            configs += ["bare+compile", "diag+compile"]
        fits: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        for config in configs:  # warm-up: CUDA context, cuBLAS handles, allocator, compiled graphs, first imports
            fit_once(args, model, config, steps=FLUSH_EVERY + 5)
        for r in range(args.repeats):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for config in order:
                fits[config].append(fit_once(args, model, config))
                print(f"  {model} repeat {r} {config}: {fits[config][-1]}", flush=True)
        results["models"][model] = fits
    if args.kernels:
        counts: dict[str, Any] = {}
        for layers in (4, 12) if not args.quick else (1, 2):
            bare, bare_names = kernels_per_step(args, "bare", layers)
            diag, diag_names = kernels_per_step(args, "diag", layers)
            busy = (bare_names.pop("__busy_us__") / 10, diag_names.pop("__busy_us__") / 10)
            bare, diag = sum(bare_names.values()) / 10, sum(diag_names.values()) / 10
            added = {k: (diag_names[k] - bare_names[k]) / 10 for k in diag_names if diag_names[k] > bare_names[k]}
            top = dict(sorted(added.items(), key=lambda kv: -kv[1])[:25])
            counts[str(layers)] = {
                "bare": bare,
                "diag": diag,
                "added": diag - bare,
                "busy_us": busy,
                "top_added": top,
            }
            print(f"  kernels per step, {layers} layers: bare {bare:.1f}, diag {diag:.1f}", flush=True)
        results["kernels"] = counts
    if args.hooks:
        results["hook_ms"] = {}
        for model in args.models:
            for config in ("diag", "handover") if model == "lm" else ("diag",):
                results["hook_ms"][f"{model} {config}"] = times = hook_times(args, model, config)
                print(f"  host ms per step in the hooks, {model} {config}: {times}", flush=True)
    return results


def versions(device: str) -> dict[str, str]:
    import lightning
    import torchmetrics

    out = {"torch": torch.__version__, "lightning": lightning.__version__, "torchmetrics": torchmetrics.__version__}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | configuration | ms / step | ratio to bare | peak memory (MiB) | added (MiB) | target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for model, fits in results["models"].items():
        bare_ms = statistics.median(f["ms"] for f in fits["bare"])
        bare_mem = statistics.median(f["peak_mib"] for f in fits["bare"])
        for config, runs in fits.items():
            ms = statistics.median(f["ms"] for f in runs)
            mem = statistics.median(f["peak_mib"] for f in runs)
            base_ms = statistics.median(f["ms"] for f in fits["bare+compile"]) if "+compile" in config else bare_ms
            ratio = ms / base_ms
            target = ""
            if config == "diag":
                ok = ratio <= TARGETS[model] and (model != "lm" or mem - bare_mem <= MEM_TARGET_MIB)
                target = f"≤ {TARGETS[model]:.2f}x" + (", ≤ 64 MiB" if model == "lm" else "") + (" ✓" if ok else " ✗")
            lines.append(
                f"| {model} | {config} | {ms:.2f} | {ratio:.3f}x | {mem:.0f} | {mem - bare_mem:+.0f} | {target} |"
            )
    for layers, k in results.get("kernels", {}).items():
        lines.append(
            f"\nkernels per non-flush step, LM with {layers} layers: bare {k['bare']:.1f}, "
            f"LossDiagnostics() {k['diag']:.1f} (added {k['added']:.1f}); device busy {k['busy_us'][0]:.0f} vs "
            f"{k['busy_us'][1]:.0f} us per step"
        )
    for name, times in results.get("hook_ms", {}).items():
        top = ", ".join(f"{k} {v:.3f}" for k, v in list(times.items())[:8])
        lines.append(f"\nhost ms per step in the package's hooks, {name}: total {sum(times.values()):.3f}: {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=["mlp", "lm"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows (MLP)")
    parser.add_argument("--kernels", action="store_true", help="count kernels per step with torch.profiler (CUDA)")
    parser.add_argument("--hooks", action="store_true", help="host ms per step in each part's per-step hooks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel("ERROR")
    warnings.filterwarnings("ignore")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(table(results))
    print("\ncommand: python " + " ".join(["benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]))
    print("versions:", results["versions"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
