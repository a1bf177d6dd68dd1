"""At 1,000+ classes small samples must not fire ``class_imbalance`` or ``constant_predictions`` by chance.

A 64-sample validation set over 1,000 classes leaves ~938 classes empty by chance alone, and 1,000 probabilities
average 0.001, so their spread is small in absolute terms. Both rules fired on such runs before (a real Trainer fit
below). The tests of the statistics compare with torch's own distributions, not with numbers from the code.
"""

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
from lightning_lossdiag.diagnosis.rules._chance import balanced_p, binomial_cdf, chi2_sf, fewest_p
from lightning_lossdiag.diagnosis.rules.data import class_imbalance, constant_predictions

CFG = DoctorConfig()


def _uniform_counts(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.bincount(torch.randint(0, classes, (n,), generator=g), minlength=classes).tolist()


def _imbalance(counts, **scalars):
    record = RunRecord()
    record.notes["data/class_counts"] = {"stage": "val", "counts": counts}
    record.notes["task"] = "multiclass"
    if scalars:
        record.add_scalars(10, scalars)
    return class_imbalance(record, CFG)


@pytest.mark.parametrize(
    ("x", "df"), [(0.3, 1), (3.84, 1), (7.0, 3), (120.0, 100), (31_000.0, 31_999), (33_000.0, 31_999)]
)
def test_chi2_tail_equals_torchs_regularized_gamma(x, df):
    a, h = torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)
    expected = torch.special.gammaincc(a, h).item()
    assert chi2_sf(x, df) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize(("k", "n", "q"), [(3, 10, 0.5), (40, 100, 0.5), (2, 7485, 0.001), (10, 99_910, 0.001)])
def test_binomial_cdf_equals_torchs_binomial(k, n, q):
    dist = torch.distributions.Binomial(n, torch.tensor(q, dtype=torch.float64))
    expected = dist.log_prob(torch.arange(k + 1, dtype=torch.float64)).exp().sum().item()
    assert binomial_cdf(k, n, q) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("n", "classes"), [(64, 1000), (768, 32_000), (2_560, 1000), (30, 100)])
def test_equal_classes_sampled_sparsely_never_fire(n, classes):
    for seed in range(20):
        counts = _uniform_counts(n, classes, seed)
        assert min(counts) == 0 or classes <= 100  # most sizes leave classes empty: the old rule always fired
        assert _imbalance(counts) == [], (n, classes, seed)


def test_a_class_far_above_its_share_among_sparse_counts_still_fires():
    counts = _uniform_counts(64, 1000, 0)
    counts[7] += 40  # one class holds 40 more of the samples than chance gives
    (found,) = _imbalance(counts)
    assert found.evidence["p_balanced"] < CFG.imbalance_p
    assert f"At ~{sum(counts) / 1000:.3g} samples a class, part of this spread is chance." in found.message


def test_one_rare_class_among_many_equal_ones_fires_though_the_overall_test_misses_it():
    counts = [100] * 999 + [10]
    assert balanced_p(counts) > 0.5  # diluted over 999 degrees of freedom
    assert fewest_p(counts) < 1e-20
    (found,) = _imbalance(counts)
    assert found.evidence["minority_class"] == 999
    assert "part of this spread is chance" not in found.message  # 99.9 samples a class


def test_imbalance_p_is_a_setting():
    counts = [19, 1]  # 20 samples: p ~ 4e-5 under equal classes
    assert _imbalance(counts) == []
    record = RunRecord()
    record.notes["data/class_counts"] = {"stage": "val", "counts": counts}
    assert [f.code for f in class_imbalance(record, DoctorConfig(imbalance_p=1e-3))] == ["class_imbalance"]
    with pytest.raises(ValueError, match="imbalance_p"):
        DoctorConfig(imbalance_p=2.0)


def _constant(std, task, classes):
    record = RunRecord()
    record.notes["task"] = task
    record.notes["data/class_counts"] = {"stage": "val", "counts": [10] * classes}
    record.add_scalars(10, {"errors/val/constant_pred_std": std})
    return constant_predictions(record, CFG)


def test_constant_predictions_scale_with_the_class_count():
    # 1,000 classes: probabilities average 1e-3; a std of 3e-4 is a third of that, not constant
    assert _constant(3e-4, "multiclass", 1000) == []
    (found,) = _constant(1e-7, "multiclass", 1000)
    assert "0.01% of their mean 1/1000" in found.message
    # two classes (and multilabel: each label its own binary task) keep the absolute limit
    assert [f.code for f in _constant(5e-4, "binary", 2)] == ["constant_predictions"]
    assert [f.code for f in _constant(5e-4, "multilabel", 1000)] == ["constant_predictions"]
    assert _constant(5e-4, "multiclass", 2) != []


class _Classifier(L.LightningModule):
    def __init__(self, classes):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, classes))

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "preds": logits.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, classes, (n,), generator=g)), batch_size=32)


def test_a_real_fit_with_1000_classes_and_64_validation_samples_has_neither_finding(tmp_path):
    diag = LossDiagnostics()
    trainer = Trainer(
        max_epochs=2,
        callbacks=[diag],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=4,
    )
    model = _Classifier(1000)
    val = _loader(64, 1000, 1)
    trainer.fit(model, _loader(256, 1000, 0), val)
    record = trainer.lossdiag_record
    counts = record.notes["data/class_counts"]["counts"]
    # each class's recall in the note (no scalar per class at 1,000 classes): from the final model, here
    x, y = val.dataset.tensors
    with torch.no_grad():
        hit = (model.net(x).argmax(1) == y).double()
    support = torch.bincount(y, minlength=1000).double()
    expected = torch.bincount(y, weights=hit, minlength=1000) / support
    noted = torch.tensor(record.notes["data/class_counts"]["recall"], dtype=torch.float64)
    assert torch.equal(noted.isnan(), support == 0)
    assert torch.allclose(noted[support > 0], expected[support > 0])
    assert (len(counts), sum(counts)) == (1000, 64)
    assert counts.count(0) > 900  # the situation of the old alarms
    std = record.last("errors/val/constant_pred_std")
    assert 1e-6 < std < CFG.constant_pred_std  # below the two-class limit: it fired before the class count counted
    codes = [f.code for f in diag.findings]
    assert "class_imbalance" not in codes
    assert "constant_predictions" not in codes


class _TinyLM(L.LightningModule):
    """An embedding and a linear head: ``(B, T, V)`` logits handed over as they are, or flattened to ``(B*T, V)``."""

    def __init__(self, vocab, flat):
        super().__init__()
        self.flat = flat
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)

    def _step(self, batch):
        x, y = batch
        logits = self.head(self.embed(x))
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), y)
        if self.flat:
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        return {"loss": loss, "preds": logits.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("flat", [False, True], ids=["BTV", "flattened"])
def test_a_language_models_long_tailed_tokens_are_no_class_imbalance(tmp_path, flat):
    vocab = 500
    g = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, vocab + 1).float()  # token frequencies of text: a long tail
    tokens = torch.multinomial(zipf / zipf.sum(), 64 * 17, replacement=True, generator=g).view(64, 17)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    diag = LossDiagnostics()
    trainer = Trainer(
        max_epochs=1,
        callbacks=[diag],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=4,
    )
    trainer.fit(_TinyLM(vocab, flat), loader, loader)
    note = trainer.lossdiag_record.notes["data/class_counts"]
    assert note.get("sequence", False) is not flat
    fired = [f.code for f in diag.findings if f.code == "class_imbalance"]
    # (B, T, V): a sequence model's tokens, no verdict; flattened, the same counts are judged like any classifier's
    assert fired == ([] if not flat else ["class_imbalance"])


def _majority(pred_share, counts, stage="val"):
    record = RunRecord()
    record.notes["task"] = "multiclass"
    record.notes["data/class_counts"] = {"stage": stage, "counts": counts}
    record.add_scalars(10, {"errors/val/majority_pred_share": pred_share})
    return constant_predictions(record, CFG)


def test_predicting_a_class_that_holds_nearly_every_sample_is_no_collapse():
    background = [99_500, 300, 200]  # segmentation: 99.5% background pixels
    assert _majority(0.996, background) == []
    (found,) = _majority(0.996, [60_000, 30_000, 10_000])  # a 60% class predicted for 99.6% of the rows
    assert found.evidence["majority_share"] == pytest.approx(0.6)
    assert "a class that holds 60% of the samples" in found.message
    (unknown,) = _majority(0.996, background, stage="train")  # counts of another stage: the old verdict
    assert "majority_share" not in unknown.evidence
