"""Wrappers that insert a module between a model and its layers (FSDP1's ``_fsdp_wrapped_module``, activation
checkpointing's ``_checkpoint_wrapped_module``) do not rename the layer groups, and a wrapper is hooked in place of
the module it wraps, never both (one activation record per forward)."""

import torch
from torch import nn

from lightning_lossdiag.callbacks._grad_groups import group_modules, group_parameters, resolve_depth


class Wrapper(nn.Module):
    """Holds its module under the attribute name FSDP1 uses, as FSDP1 does, and forwards to it."""

    def __init__(self, module: nn.Module, attr: str = "_fsdp_wrapped_module") -> None:
        super().__init__()
        setattr(self, attr, module)
        self.attr = attr

    def forward(self, x):
        return getattr(self, self.attr)(x)


class Model(nn.Module):
    def __init__(self, wrap: bool) -> None:
        super().__init__()
        layers = [nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)]
        if wrap:
            layers[0] = Wrapper(layers[0])
            layers[2] = Wrapper(layers[2], "_checkpoint_wrapped_module")
        net = nn.Sequential(*layers)
        self.net = Wrapper(net) if wrap else net


def test_wrapped_models_keep_the_groups_of_the_plain_model():
    plain, wrapped = Model(False), Model(True)
    assert any("_fsdp_wrapped_module" in n for n, _ in wrapped.named_parameters())
    for depth in (1, 2):
        assert group_parameters(wrapped, depth) == group_parameters(plain, depth)
    assert resolve_depth(wrapped, "auto", 32) == resolve_depth(plain, "auto", 32) == 2


def test_a_wrapper_is_hooked_in_place_of_what_it_wraps():
    wrapped = Model(True)
    groups = group_modules(wrapped, depth=2)
    assert list(groups) == ["net.0", "net.2"]
    assert [type(m).__name__ for m in groups["net.0"]] == ["Wrapper", "ReLU"]
    calls = []
    for members in groups.values():
        for m in members:
            m.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    wrapped.net(torch.randn(5, 3))
    assert calls == ["Wrapper", "ReLU", "Wrapper"]  # the inner Linear layers are not recorded a second time
    top = group_modules(wrapped, depth=1)
    assert list(top) == ["net"]
    assert [type(m).__name__ for m in top["net"]] == ["Wrapper"]


def test_a_wrapped_leaf_above_the_depth_is_still_hooked():
    plain, wrapped = Model(False), Model(True)
    for depth in (3, 4):  # deeper than the layers: every leaf layer is hooked, wrapped or not
        names = {k: [type(m).__name__ for m in v] for k, v in group_modules(plain, depth).items()}
        wrapped_names = {k: [type(m).__name__ for m in v] for k, v in group_modules(wrapped, depth).items()}
        assert list(wrapped_names) == list(names) == ["net.0", "net.2"]
        assert wrapped_names == {"net.0": ["Wrapper", "ReLU"], "net.2": ["Wrapper"]}
