"""The real TensorBoard server serves what a finished run wrote: scalars, histograms, images, PR curves, text, layout.

The server runs as a child process on loopback (port chosen by the OS) and is queried only on 127.0.0.1 through
its HTTP API. It loads event files asynchronously, so each endpoint is polled (bounded, short waits) until the
expected tags appear or a 90 s deadline passes.
"""

from __future__ import annotations

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
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_lossdiag import LossDiagnostics

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


def _only_run(body: dict) -> tuple[str, object]:
    assert len(body) == 1, f"expected one run, got {sorted(body)}"
    return next(iter(body.items()))


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
        port = _wait_for_port(proc, log_file, deadline)

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
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
