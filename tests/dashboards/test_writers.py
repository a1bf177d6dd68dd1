"""write_scalars: Lightning's TensorBoardLogger gets one event per flush, with what log_metrics would have written."""

import glob
import math

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from lightning_lossdiag.dashboards.writers import write_scalars

FLUSHES = [
    (10, {"train/loss": 0.75, "grad/norm/net.0": 3.25, "act/mean/net.1": -0.5}),
    (20, {"train/loss": 0.5, "grad/norm/net.0": math.inf, "act/mean/net.1": 1e-8}),
]


def _series(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _events_with_summaries(log_dir: str) -> int:
    (path,) = glob.glob(f"{log_dir}/events.out.tfevents.*")
    return sum(1 for event in EventFileLoader(path).Load() if event.HasField("summary"))


def test_tensorboard_gets_the_series_log_metrics_writes_in_one_event_per_flush(tmp_path):
    ours = TensorBoardLogger(str(tmp_path / "ours"), prefix="fit")
    lightning = TensorBoardLogger(str(tmp_path / "lightning"), prefix="fit")
    for step, metrics in FLUSHES:
        write_scalars(ours, metrics, step)
        lightning.log_metrics(metrics, step=step)
    ours.experiment.flush()
    lightning.experiment.flush()

    expected = _series(lightning.log_dir)
    assert set(expected) == {f"fit-{k}" for k in FLUSHES[0][1]}  # the prefix is applied as Lightning applies it
    assert _series(ours.log_dir) == expected
    assert _events_with_summaries(ours.log_dir) == len(FLUSHES)
    assert _events_with_summaries(lightning.log_dir) == sum(len(m) for _, m in FLUSHES)


def test_a_logger_with_its_own_log_metrics_and_other_loggers_get_log_metrics(tmp_path):
    class Custom(TensorBoardLogger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))

    custom = Custom(str(tmp_path / "custom"))
    write_scalars(custom, FLUSHES[0][1], 10)
    assert custom.calls == [(10, FLUSHES[0][1])]

    csv = CSVLogger(str(tmp_path / "csv"))
    write_scalars(csv, FLUSHES[0][1], 10)
    csv.save()
    text = (tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "grad/norm/net.0" in text.splitlines()[0]
    assert "3.25" in text
