"""``class_imbalance`` of a multilabel tagger: rare positives, and a model that predicts no label at all.

Before, multilabel tasks had no verdict: a 1,000-label tagger with 1% positives and a recall of 0 ended with "no
findings". Every expected number is computed here from the counts.
"""

import re

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules.data import class_imbalance

CFG = DoctorConfig()


def _record(counts, rows, recall=None, stage="val"):
    record = RunRecord()
    record.notes["task"] = "multilabel"
    record.notes["data/class_counts"] = {"stage": stage, "counts": counts}
    scalars = {f"errors/{stage}/samples": float(rows)}
    if recall is not None:
        scalars[f"metrics/{stage}/recall"] = recall
    record.add_scalars(50, scalars)
    return record


def _tagger_counts(labels=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(5, 40, (labels,), generator=g).tolist()
    counts[3] = counts[11] = 0  # two labels without any positive
    return counts


def test_rare_positives_and_zero_recall_warn_with_a_short_summary():
    counts = _tagger_counts()
    rows = 2000
    (found,) = class_imbalance(_record(counts, rows, recall=0.0), CFG)
    share = sum(counts) / (rows * len(counts))
    assert found.code == "class_imbalance"
    assert found.severity == "warning"
    assert found.evidence["positive_share"] == pytest.approx(share)
    assert found.evidence["empty_labels"] == 2
    non_empty = [c for c in counts if c > 0]
    assert found.evidence["ratio"] == pytest.approx(max(counts) / min(non_empty))
    assert f"{float(f'{share * 100:.3g}'):g}% of the val label values" in found.message
    assert "2 labels have no positive at all (3, 11)" in found.message
    assert "recall is 0" in found.message
    assert "pos_weight: auto" in found.message
    assert len(re.findall(r"\d+ \(\d+\)", found.message)) == 5  # five rarest labels, never all 1,000 counts
    assert len(found.message) < 700


def test_a_tagger_that_finds_positives_gets_info_and_no_recall_says_so():
    counts = _tagger_counts()
    (found,) = class_imbalance(_record(counts, 2000, recall=0.6), CFG)
    assert found.severity == "info"
    assert "still finds positives (recall 0.6)" in found.message
    (unknown,) = class_imbalance(_record(counts, 2000), CFG)
    assert unknown.severity == "info"
    assert "No recall was logged" in unknown.message


def test_frequent_positives_do_not_fire():
    counts = [300] * 10  # 300 of 1000 rows: 30% positives
    assert class_imbalance(_record(counts, 1000, recall=0.0), CFG) == []
    assert class_imbalance(_record(counts, 1000, recall=0.0), DoctorConfig(imbalance_share=0.5)) != []


class _Tagger(L.LightningModule):
    def __init__(self, labels):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, labels))

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        return {"loss": loss, "preds": logits.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_real_tagger_that_predicts_no_label_gets_the_warning(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    y = (torch.rand(512, 200, generator=g) < 0.01).float()  # 1% positives, unrelated to the inputs
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    diag = LossDiagnostics()
    trainer = Trainer(
        max_epochs=3,
        callbacks=[diag],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=4,
    )
    trainer.fit(_Tagger(200), loader, loader)
    record = trainer.lossdiag_record
    assert record.last("metrics/val/recall") <= CFG.recall_zero  # the situation: no positive predicted
    assert record.last("metrics/val/accuracy") > 0.98
    (found,) = [f for f in diag.findings if f.code == "class_imbalance"]
    assert found.severity == "warning"
    assert found.evidence["positive_share"] == pytest.approx(y.mean().item())
    assert found.evidence["num_labels"] == 200
