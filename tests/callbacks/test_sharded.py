"""Sharded strategies hand each rank a slice of every gradient. Under FSDP2 (ModelParallelStrategy) and FSDP1
(FSDPStrategy) the gradient monitor sums the shards and the NaN guard decides on all of them (two-process tests in
tests/distributed/test_fsdp2.py and test_fsdp1.py); DeepSpeed, and FSDP1 set-ups whose shards cannot be summed, are
refused at fit start with a clear message and a way out."""

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import GradientMonitor, LossDiagnostics, NonFiniteGuard
from lightning_lossdiag.callbacks._shards import fsdp1_group, shard_reducer


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])  # FSDP2: gradients become DTensor shards

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """ModelParallelStrategy starts a process group in this process: end it, so later fork-based tests start clean."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _fit(tmp_path, callbacks, strategy=None, model=None):
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy() if strategy is None else strategy,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    x = torch.randn(16, 4)
    trainer.fit(Tiny() if model is None else model, DataLoader(TensorDataset(x, x.sum(1)), batch_size=8))
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_fsdp2_trains_with_gradient_norms_and_the_guard(tmp_path, policy):
    trainer = _fit(tmp_path, [LossDiagnostics(on_nonfinite=policy, activations=False)])
    assert trainer.global_step == 2
    assert trainer.lossdiag_record.values("grad/norm_total")


def test_deepspeed_is_refused_with_a_way_out_and_fsdp_is_not():
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=type("DeepSpeedStrategy", (), {})())
    with pytest.raises(RuntimeError, match=r"GradientMonitor does not support DeepSpeedStrategy yet: .*=False"):
        GradientMonitor().setup(trainer, None, "fit")
    with pytest.raises(RuntimeError, match=r"NonFiniteGuard does not support DeepSpeedStrategy yet: .*'warn'"):
        NonFiniteGuard(policy="skip").setup(trainer, None, "fit")
    NonFiniteGuard(policy="warn").setup(trainer, None, "fit")  # "warn" only records: nothing to refuse
    for name in ("FSDPStrategy", "ModelParallelStrategy"):  # their shards are summed (tests/distributed)
        base = type(name, (), {})
        trainer = SimpleNamespace(strategy=type("MyStrategy", (base,), {})())  # subclasses too
        GradientMonitor().setup(trainer, None, "fit")
        NonFiniteGuard(policy="skip").setup(trainer, None, "fit")


class CpuFSDP(FSDPStrategy):
    """Lightning's FSDP1 strategy on the CPU (its accelerator check compares the exact class)."""


class Wrapped(Tiny):
    """FSDP1 units made in ``configure_model`` (Lightning keeps them): one process, over gloo."""

    def __init__(self, **fsdp):
        super().__init__()
        self.fsdp = fsdp

    def configure_model(self):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(self.net, FSDP):
            self.net = FSDP(self.net, device_id=torch.device("cpu"), **self.fsdp)


def _fit_fsdp1(tmp_path, model, callbacks):
    return _fit(tmp_path, callbacks, CpuFSDP(process_group_backend="gloo"), model)


@pytest.mark.slow
def test_fsdp1_without_original_parameters_fails_at_fit_start(tmp_path):
    # use_orig_params=False hands the optimizer flat parameters that mix layers: no per-layer norms to give
    model = Wrapped(use_orig_params=False)
    with pytest.raises(RuntimeError, match=r"use_orig_params=False .* use FSDPStrategy\(use_orig_params=True\)"):
        _fit_fsdp1(tmp_path, model, [LossDiagnostics(activations=False)])
    assert model.global_step == 0  # refused before the first step


@pytest.mark.slow
def test_fsdp1_layers_keep_their_names_and_no_shard_needs_no_reduction(tmp_path):
    from torch.distributed.fsdp import ShardingStrategy

    model = Wrapped(use_orig_params=True, sharding_strategy=ShardingStrategy.NO_SHARD)
    trainer = _fit_fsdp1(tmp_path, model, [LossDiagnostics(activations=False)])
    assert trainer.global_step == 2
    keys = set(trainer.lossdiag_record.keys("grad/"))
    assert "grad/norm/net" in keys  # the layer's own name, not "net._fsdp_wrapped_module"
    assert not any("_fsdp_wrapped_module" in k for k in keys)
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item()  # whole gradients (NO_SHARD)
    assert trainer.lossdiag_record.values("grad/norm_total")[-1] == pytest.approx(full, rel=1e-5)
    assert all(getattr(p, "_fsdp_flattened", False) for p in model.parameters())  # FSDP1 pieces, as FSDP marks them
    assert shard_reducer(list(model.parameters()), trainer.strategy.model) is None  # NO_SHARD: whole gradients


def test_fsdp1_set_ups_whose_shards_cannot_be_summed_are_named():
    marked = nn.Parameter(torch.ones(2))
    marked._fsdp_flattened = True  # what FSDP1 sets on the parameters it shards
    with pytest.raises(RuntimeError, match="no FullyShardedDataParallel module was found"):
        fsdp1_group([marked], nn.Linear(2, 1))
    assert fsdp1_group([nn.Parameter(torch.ones(2))], None) is None  # nothing sharded: nothing to sum


class Whole(Tiny):
    """Left to the strategy to wrap."""

    def configure_model(self):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Lightning's FSDPStrategy refuses the CPU")
def test_fsdp1_on_one_cuda_device_with_lightnings_own_strategy(tmp_path):
    # Lightning wraps the whole module in one FSDP unit (one process: FSDP shards nothing, NO_SHARD); the norms are
    # those of the whole gradients, with the layers' own names
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cuda",
        devices=1,
        strategy=FSDPStrategy(),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=[LossDiagnostics(activations=False)],
    )
    model = Whole()
    x = torch.randn(16, 4)
    trainer.fit(model, DataLoader(TensorDataset(x, x.sum(1)), batch_size=8))
    assert trainer.global_step == 2
    assert "grad/norm/net" in trainer.lossdiag_record.keys("grad/")
    full = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).norm().item()
    assert trainer.lossdiag_record.values("grad/norm_total")[-1] == pytest.approx(full, rel=1e-5)
