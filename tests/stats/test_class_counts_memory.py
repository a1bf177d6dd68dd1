"""The class engine's memory at real sizes: pieces of an update give the whole update's counts; bounded temporaries.

On a 32k-token LM on this CPU, ``LossDiagnostics()`` with the logits handed over added +271 MiB of peak memory:
the engine held the last step's logits into the next forward, the row losses made a float32 log-softmax of the whole
``(B*T, V)`` output, and the epoch end turned the ``(V, 2, T)`` curve counts into float64 at once (twice).
"""

import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from lightning_lossdiag.callbacks._class_engine import EngineConfig, engine_for
from lightning_lossdiag.callbacks._task import TaskInfo
from lightning_lossdiag.stats import classification, label_counts, row_ops
from lightning_lossdiag.stats.classification import ClassCounts


def _states(counts: ClassCounts) -> dict[str, torch.Tensor]:
    out = {"store": counts._store.clone(), "curves": counts.curves.clone(), "range": counts._prob_range.clone()}
    out.update(worst_scores=counts.worst.padded_scores.clone(), worst_rows=counts.worst.padded_rows.clone())
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, equal_nan=True, msg=key)


def _run(monkeypatch, attr_owner, attr, small, build, batches):
    whole = build()
    for preds, target in batches:
        whole.update(preds, target)
    monkeypatch.setattr(attr_owner, attr, small)
    pieces = build()
    for preds, target in batches:
        pieces.update(preds, target)
    return _states(whole), _states(pieces)


@pytest.mark.parametrize("inputs", ["logits", "probabilities", "log_probabilities"])
def test_multilabel_pieces_give_the_counts_of_the_whole_update(monkeypatch, inputs):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, generator=g)
    if inputs == "probabilities":
        x = x.sigmoid()
    elif inputs == "log_probabilities":
        x = torch.nn.functional.logsigmoid(x)
    y = (torch.rand(40, 7, generator=g) < 0.3).float()
    y[3, 2], y[5, :], y[11, 4] = -1.0, float("nan"), 2.0  # left-out values, a row with none kept
    batches = [(x, y), (x[:13], y[:13].long().clamp(0, 1))]  # int targets too

    def build():
        return ClassCounts("multilabel", inputs, 7, thresholds=11, budget=10_000, worst_k=6)

    whole, pieces = _run(monkeypatch, label_counts, "_LABEL_VALUES", 20, build, batches)  # 2 rows a piece
    _assert_same(whole, pieces, exact=False)  # float sums in another order: equal to rounding
    counts = ClassCounts("multilabel", inputs, 7, thresholds=11)
    counts.update(x, y)
    kept = (y == y.clamp(0, 1)) & ~y.isnan()
    assert counts.per_class[0].tolist() == ((y > 0.5) & kept).sum(0).double().tolist()  # support per label
    assert counts.label_rows.tolist() == kept.sum(0).double().tolist()


def test_multilabel_worst_rows_keep_their_sample_index_across_pieces(monkeypatch):
    x = torch.zeros(30, 4)
    y = torch.zeros(30, 4)
    x[[4, 17, 28]] = torch.tensor([5.0, 6.0, 7.0])[:, None]  # confident and wrong: the worst rows
    monkeypatch.setattr(label_counts, "_LABEL_VALUES", 8)  # 2 rows a piece: the worst rows lie in 3 pieces
    counts = ClassCounts("multilabel", "logits", 4, worst_k=3)
    counts.update(x[:10], y[:10])
    counts.update(x[10:], y[10:])
    assert sorted(counts.worst.rows[:, 0].long().tolist()) == [4, 17, 28]


@pytest.mark.parametrize(
    ("shape", "class_dim", "dtype"),
    [((24, 50), 1, torch.float32), ((3, 50, 8), 1, torch.float32), ((1, 50, 12), 1, torch.float32)]
    + [((4, 6, 50), -1, torch.bfloat16)],
    ids=["rows", "dense", "one_image", "btv_bf16"],
)
def test_row_losses_in_pieces_give_the_counts_of_the_whole_update(monkeypatch, shape, class_dim, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).mul_(4).to(dtype)
    target_shape = [s for d, s in enumerate(shape) if d != class_dim % len(shape)]
    y = torch.randint(0, 50, target_shape, generator=g)
    y.view(-1)[::5] = -100

    def build():
        return ClassCounts("multiclass", "logits", 50, class_dim=class_dim, ignore_index=-100, thresholds=11)

    whole, pieces = _run(monkeypatch, row_ops, "_NLL_VALUES", 110, build, [(x, y)])
    _assert_same(whole, pieces, exact=False)
    nll = torch.nn.functional.cross_entropy(x.float().movedim(class_dim, 1), y, ignore_index=-100, reduction="sum")
    assert pieces["store"][classification.ClassCounts("multiclass", "logits", 50)._at["ranking"] + 1].item() == (
        pytest.approx(nll.item(), rel=1e-5)
    )


def test_the_multilabel_scratch_buffers_are_kept_and_bounded(monkeypatch):
    monkeypatch.setattr(label_counts, "_LABEL_VALUES", 4_000)
    counts = ClassCounts("multilabel", "logits", 100)
    counts.update(torch.randn(200, 100), (torch.rand(200, 100) < 0.1).float())  # 20,000 values: 5 pieces
    held = dict(counts._work._buffers)
    assert held, "the every-value statistics wrote into kept buffers"
    assert counts._work.nbytes <= 4_000 * 32  # a piece's values (0/1 float masks on the CPU), not the batch's
    counts.update(torch.randn(200, 100), (torch.rand(200, 100) < 0.1).float())
    assert all(counts._work._buffers[k].data_ptr() == b.data_ptr() for k, b in held.items())  # reused, not renewed


def _engine(num_classes: int = 40):
    class _Trainer:
        global_rank, world_size = 0, 1

    info = TaskInfo("multiclass", "logits", num_classes)
    return engine_for(_Trainer(), "train", info, EngineConfig(thresholds=11), torch.device("cpu"), 50, 1 << 30)


def test_the_engine_does_not_keep_a_step_alive():
    engine = _engine()
    preds, target = torch.randn(64, 40), torch.randint(0, 40, (64,))
    engine.add(preds, target)
    engine.add(preds, target)  # the other reader of the same step: counted once
    engine.drain()
    engine.counts.settle()  # held updates are added before a read
    assert engine.counts.rows[0].item() == 64
    gone = weakref.ref(preds)
    large = torch.randn(4096, 40)  # 640 KiB: counted at once, held by no one afterwards
    engine.add(large, torch.randint(0, 40, (4096,)))
    dead = weakref.ref(large)
    del preds, large
    assert dead() is None
    assert gone() is None


def test_a_new_epoch_lets_the_last_counts_go_before_it_builds_its_own():
    engine = _engine()
    engine.add(torch.randn(8, 40), torch.randint(0, 40, (8,)))
    engine.view(None)  # the epoch end's merged view (cached)
    engine.finish()
    old = weakref.ref(engine.counts)
    seen: list[bool] = []
    build = classification.ClassCounts.__init__

    def spy(self, *args, **kwargs):
        seen.append(old() is None)  # the old counts are gone when the new ones are built
        build(self, *args, **kwargs)

    try:
        classification.ClassCounts.__init__ = spy  # type: ignore[method-assign]
        engine.add(torch.randn(8, 40), torch.randint(0, 40, (8,)))
    finally:
        classification.ClassCounts.__init__ = build  # type: ignore[method-assign]
    assert seen == [True]
    engine.drain()
    engine.counts.settle()  # held updates are added before a read
    assert engine.counts.rows[0].item() == 8  # the new epoch's step alone


_PEAK = textwrap.dedent(
    """
    import resource, sys, tempfile, torch
    from torch.utils.tensorboard import SummaryWriter
    from lightning_lossdiag.callbacks._class_state import summary_of
    from lightning_lossdiag.dashboards.class_views import write_class_views
    from lightning_lossdiag.stats.class_metrics import class_metrics
    from lightning_lossdiag.stats.classification import ClassCounts

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    counts = ClassCounts("multiclass", "logits", 32000, class_dim=-1, ignore_index=-100)
    x = torch.randn(4, 64, 32000)  # (B, T, V): 31 MiB of float32 logits
    y = torch.randint(0, 32000, (4, 64))
    writer = SummaryWriter(tempfile.mkdtemp())
    counts.update(x[:1], y[:1])
    write_class_views(writer, "errors/val", 0, summary_of(counts), max_classes=32, k=10)  # warm: imports, figures
    before = peak()
    counts.update(x, y)
    update = peak() - before
    before = peak()
    class_metrics(counts)
    write_class_views(writer, "errors/val", 1, summary_of(counts), max_classes=32, k=10)
    print(update, peak() - before)
    """
)


@pytest.mark.slow
def test_an_update_and_an_epoch_end_at_32k_classes_add_little_peak_memory():
    # a fixed mmap threshold makes glibc hand every freed buffer back, so the peak RSS follows the live bytes
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True, env=env)
    update, epoch_end = (float(v) for v in out.stdout.split()[-2:])
    # before: a whole-output log-softmax in the update; at epoch end float64 copies of the (32000, 2, 101) curve
    # counts, whole (52 MiB, twice) and summed (26 MiB): +107 MiB; now the figures and blocks of 1,024 classes
    assert update < 24, f"an update of (4, 64, 32000) logits added {update:.0f} MiB"
    assert epoch_end < 32, f"the epoch end of 32,000 classes added {epoch_end:.0f} MiB"
