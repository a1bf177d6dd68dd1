"""The real TensorBoard server serves what a finished run wrote: scalars, histograms, images, PR curves, text, layout.

The server runs as a child process on loopback (port chosen by the OS) and is queried only on 127.0.0.1 through
its HTTP API. It loads event files asynchronously, so each endpoint is polled (bounded, short waits) until the
expected tags appear or a 90 s deadline passes.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics, LossMixin

_DEADLINE_S = 90.0
_POLL_S = 0.5
_URL = re.compile(r"TensorBoard \S+ at http://127\.0\.0\.1:(\d+)/")
# loopback only, and never through a proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

EPOCHS, BATCHES, FLUSH_EVERY = 2, 6, 2


def _finished_run(tmp_path: Path, tiny_classifier, class_loaders, trainer_kwargs) -> Path:
    logdir = tmp_path / "tb"
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        limit_train_batches=BATCHES,
        limit_val_batches=2,
        log_every_n_steps=FLUSH_EVERY,
        logger=TensorBoardLogger(save_dir=str(logdir), name="run"),
        callbacks=[LossDiagnostics()],
        **trainer_kwargs,
    )
    trainer.fit(tiny_classifier(), *class_loaders)
    return logdir


def _wait_for_port(proc: subprocess.Popen, log_file: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        found = _URL.search(log_file.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log_file.read_text(errors='replace')}")
        time.sleep(_POLL_S)
    pytest.fail(f"tensorboard printed no address in time:\n{log_file.read_text(errors='replace')}")


def _get(port: int, path: str, **query: str):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with _OPENER.open(url, timeout=10) as response:
        return json.loads(response.read().decode("utf-8"))


def _poll(port: int, path: str, ready, deadline: float):
    """GET ``path`` until ``ready(body)`` is true or the deadline passes; returns the last body."""
    body = None
    while time.monotonic() < deadline:
        body = _get(port, path)
        if ready(body):
            return body
        time.sleep(_POLL_S)
    return body


@contextlib.contextmanager
def _serve(logdir: Path, tmp_path: Path):
    """A TensorBoard server on loopback over ``logdir``: yields ``(port, deadline)``, stops it on the way out."""
    log_file = tmp_path / "tensorboard.log"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                "--port", "0", "--load_fast", "false", "--reload_interval", "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + _DEADLINE_S
        yield _wait_for_port(proc, log_file, deadline), deadline
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _only_run(body: dict) -> tuple[str, object]:
    """The run's entry; beside it there may only be its HParams session (a run of its own, ``.../lossdiag_hparams``)."""
    runs = {run: tags for run, tags in body.items() if not run.endswith("/lossdiag_hparams")}
    assert len(runs) == 1, f"expected one run (and its HParams session), got {sorted(body)}"
    assert len(body) - len(runs) <= 1, sorted(body)
    return next(iter(runs.items()))


@pytest.mark.slow
def test_tensorboard_server_serves_every_kind_of_data_we_write(
    tmp_path, tiny_classifier, class_loaders, trainer_kwargs
):
    logdir = _finished_run(tmp_path, tiny_classifier, class_loaders, trainer_kwargs)

    expected = {
        "/data/plugin/scalars/tags": {"train/loss", "train/loss_ema", "grad/norm_total", "metrics/val/accuracy"},
        "/data/plugin/histograms/tags": {"errors/val/pred_dist", "errors/val/target_dist"},
        "/data/plugin/images/tags": {"errors/val/confusion_matrix"},
        "/data/plugin/pr_curves/tags": {f"errors/val/pr_curve/{c}" for c in range(3)},
        # SummaryWriter.add_text(tag) stores the text under "<tag>/text_summary"
        "/data/plugin/text/tags": {"errors/val/worst/text_summary", "diagnosis/text_summary"},
    }

    def tags_of(body) -> set[str]:
        if not body:
            return set()
        _, tags = _only_run(body)
        return set(tags)

    with _serve(logdir, tmp_path) as (port, deadline):
        served: dict[str, set[str]] = {}
        for path, want in expected.items():
            body = _poll(port, path, lambda b, want=want: want <= tags_of(b), deadline)
            served[path] = tags_of(body)
        missing = {path: sorted(want - served[path]) for path, want in expected.items() if not want <= served[path]}
        assert not missing, f"tags not served: {missing}"

        # the train/loss series has one point per flush: every FLUSH_EVERY optimizer steps over the whole run
        run = _only_run(_get(port, "/data/plugin/scalars/tags"))[0]
        points = _get(port, "/data/plugin/scalars/scalars", run=run, tag="train/loss")
        assert [p[1] for p in points] == list(range(FLUSH_EVERY, EPOCHS * BATCHES + 1, FLUSH_EVERY))

        layout = _poll(port, "/data/plugin/custom_scalars/layout", lambda b: bool(b.get("category")), deadline)
        categories = {c["title"]: c for c in layout.get("category", [])}
        assert "lossdiag" in categories, f"categories served: {sorted(categories)}"
        charts = {chart["title"]: chart["multiline"]["tag"] for chart in categories["lossdiag"]["chart"]}
        assert len(charts) >= 3
        assert all(regexes for regexes in charts.values())
        # the loss, gradient-norm and learning-rate charts point at scalar tags the server really has
        scalar_tags = served["/data/plugin/scalars/tags"]
        for key in ("train/loss", "grad/norm_total", "lr/"):
            chart = [t for t, regexes in charts.items() if any(key in r for r in regexes)]
            assert chart, f"no chart for {key!r} in {sorted(charts)}"
            regexes = charts[chart[0]]
            assert any(re.match(r, tag) for r in regexes for tag in scalar_tags), (chart[0], regexes)


class _ThousandClasses(LossMixin, L.LightningModule):
    """A 1,000-class head over 16 features; half the samples of class c look like class c + 1 (confused pairs)."""

    def __init__(self) -> None:
        super().__init__(loss="cross_entropy")
        self.net = nn.Linear(16, 1000)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.compute_loss(self.net(x), y, stage="train")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return self.compute_loss(self.net(x), y, stage="val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _thousand_class_loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 1000, (256,), generator=g)
    return DataLoader(TensorDataset(torch.randn(256, 16, generator=g), y), batch_size=64)


@pytest.mark.slow
def test_tensorboard_server_at_1000_classes_serves_a_bounded_readable_set(tmp_path, trainer_kwargs):
    logdir = tmp_path / "tb"
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        log_every_n_steps=2,
        logger=TensorBoardLogger(save_dir=str(logdir), name="run"),
        callbacks=[LossDiagnostics(errors={"stages": ["train", "val"]}, activations=False)],
        **trainer_kwargs,
    )
    trainer.fit(_ThousandClasses(), _thousand_class_loader(0), _thousand_class_loader(1))
    worst = {f"errors/val/pr_curve/worst_{r:02d}" for r in range(1, 11)}
    expected = {
        "/data/plugin/images/tags": {"errors/val/confusion_matrix"},
        "/data/plugin/pr_curves/tags": {"errors/val/pr_curve/micro", *worst},
        "/data/plugin/histograms/tags": {"errors/val/class_recall", "errors/val/class_precision"},
        "/data/plugin/text/tags": {"errors/val/worst_classes/text_summary", "errors/val/confused_pairs/text_summary"},
        "/data/plugin/scalars/tags": {"metrics/val/accuracy", "metrics/val/auroc", "errors/val/samples"},
    }

    def tags_of(body) -> set[str]:
        return set(_only_run(body)[1]) if body else set()

    with _serve(logdir, tmp_path) as (port, deadline):
        served = {
            path: tags_of(_poll(port, path, lambda b, w=want: w <= tags_of(b), deadline))
            for path, want in expected.items()
        }
        missing = {path: sorted(want - served[path]) for path, want in expected.items() if not want <= served[path]}
        assert not missing, f"tags not served: {missing}"
        # bounded whatever the class count: no curve, scalar or tick per class
        for stage in ("train", "val"):
            curves = {t for t in served["/data/plugin/pr_curves/tags"] if t.startswith(f"errors/{stage}/")}
            assert len(curves) == 11, sorted(curves)
        scalars = served["/data/plugin/scalars/tags"]
        assert not [t for t in scalars if "/recall/" in t], "no per-class recall scalar at 1,000 classes"
        assert len(scalars) < 80, len(scalars)
        assert sum(len(tags) for tags in served.values()) < 150
        # the confusion image is the most confused classes plus "other": a normal size, not 1,000 ticks
        run = _only_run(_get(port, "/data/plugin/images/tags"))[0]
        shown = _get(port, "/data/plugin/images/images", run=run, tag="errors/val/confusion_matrix", sample="0")
        assert [entry["step"] for entry in shown] == [4, 8]
        # the worst-classes table names real classes, ranked
        table = _get(port, "/data/plugin/text/text", run=run, tag="errors/val/worst_classes/text_summary")
        assert "worst_01" in table[-1]["text"]
