"""Layer groups: map parameters and submodules to short, TensorBoard-safe group names (pure helpers, no Lightning).

A group is the module path of a parameter (or submodule) cut to its first ``depth`` components: with ``depth=1``
``encoder.0.weight`` belongs to ``encoder``, with ``depth=2`` to ``encoder.0``. Parameters held directly by the
root module belong to ``root``. Groups keep the order in which the model defines them; when there are more than
``max_groups``, the first ``max_groups - 1`` keep their names and the rest are merged into ``other``. Names are
made safe for TensorBoard tags (only letters, digits, ``_``, ``-``, ``.`` and ``/``).

Shared by the gradient monitor (parameter groups) and the activation monitor (module groups).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ROOT_GROUP = "root"
OTHER_GROUP = "other"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/]")


def safe_tag(name: str) -> str:
    """Make ``name`` safe inside a TensorBoard tag (unsafe characters become ``_``).

    Example:
        >>> safe_tag("blocks.0:attn weight")
        'blocks.0_attn_weight'
    """
    return _UNSAFE.sub("_", name) or "_"


#: module-path components that wrappers insert between a module and its parameters (FSDP1, activation checkpointing)
WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """``name`` without the components wrappers insert, so a wrapped model keeps its layers' names.

    Example:
        >>> clean_name("net._fsdp_wrapped_module.0.weight"), clean_name("head.bias")
        ('net.0.weight', 'head.bias')
    """
    if "_wrapped_module" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


AUTO_DEPTH = "auto"
_MAX_AUTO_DEPTH = 8


def check_depth(depth: int | str) -> None:
    """Validate a ``depth`` option: an integer >= 1 or ``"auto"``."""
    if depth == AUTO_DEPTH:
        return
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"`depth` must be an integer >= 1 or 'auto', got {depth!r}")


def resolve_depth(module: nn.Module, depth: int | str, max_groups: int) -> int:
    """``depth`` itself, or for ``"auto"`` the deepest depth whose parameter groups number at most ``max_groups``.

    So a ``Sequential`` of 10 layers held as ``self.net`` gets one group per layer (``net.0``, ``net.1``, ...)
    instead of a single ``net`` group, and a 100-block model stays at the block level.

    Example:
        >>> class M(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> resolve_depth(M(), "auto", 32), resolve_depth(M(), "auto", 1), resolve_depth(M(), 3, 32)
        (2, 1, 3)
    """
    check_depth(depth)
    if depth != AUTO_DEPTH:
        return int(depth)
    paths = [clean_name(name).rpartition(".")[0] for name, _ in module.named_parameters()]
    best, count = 1, 0
    for d in range(1, _MAX_AUTO_DEPTH + 1):
        n = len({group_of(p, d) for p in paths})
        if n > max_groups:
            break
        if n > count:  # a deeper cut that splits nothing further is not taken
            best, count = d, n
    return best


def _check(depth: int, max_groups: int) -> None:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"`depth` must be an integer >= 1, got {depth!r}")
    if not isinstance(max_groups, int) or isinstance(max_groups, bool) or max_groups < 1:
        raise ValueError(f"`max_groups` must be an integer >= 1, got {max_groups!r}")


def group_of(module_path: str, depth: int) -> str:
    """The group of a module path (``""`` is the root module) cut to ``depth`` components, made tag-safe.

    Example:
        >>> group_of("encoder.0.linear", 2), group_of("", 1)
        ('encoder.0', 'root')
    """
    if not module_path:
        return ROOT_GROUP
    return safe_tag(".".join(module_path.split(".")[:depth]))


def cap_groups(groups: list[str], max_groups: int) -> dict[str, str]:
    """Map each distinct group (in order) to its final name: the first ``max_groups - 1`` stay, the rest -> ``other``.

    Nothing is merged when there are at most ``max_groups`` groups.

    Example:
        >>> cap_groups(["a", "b", "c", "d"], 3)
        {'a': 'a', 'b': 'b', 'c': 'other', 'd': 'other'}
    """
    distinct = list(dict.fromkeys(groups))
    if len(distinct) <= max_groups:
        return {g: g for g in distinct}
    keep = set(distinct[: max_groups - 1])
    return {g: (g if g in keep else OTHER_GROUP) for g in distinct}


def group_parameters(module: nn.Module, depth: int = 1, max_groups: int = 32) -> dict[str, list[str]]:
    """Group the parameters of ``module`` by module path cut to ``depth``: ``group -> [parameter names]``.

    Shared parameters are listed once (under their first name); frozen parameters are included. Names are those of
    :func:`clean_name` (an FSDP1-wrapped ``net.0`` is still ``net.0``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
        >>> group_parameters(net, depth=1, max_groups=8)
        {'0': ['0.weight', '0.bias'], '2': ['2.0.weight', '2.0.bias', '2.1.weight', '2.1.bias']}
        >>> list(group_parameters(net, depth=2, max_groups=2))
        ['0', 'other']
    """
    _check(depth, max_groups)
    names = [clean_name(name) for name, _ in module.named_parameters()]
    raw = [group_of(name.rpartition(".")[0], depth) for name in names]
    final = cap_groups(raw, max_groups)
    out: dict[str, list[str]] = {}
    for name, g in zip(names, raw, strict=True):
        out.setdefault(final[g], []).append(name)
    return out


def _is_leaf(module: nn.Module) -> bool:
    """No children, or only a wrapper's one wrapped module that has none (a wrapped layer is still a leaf)."""
    children = list(module.named_children())
    if not children:
        return True
    return len(children) == 1 and children[0][0] in WRAPPER_PARTS and _is_leaf(children[0][1])


def group_modules(module: nn.Module, depth: int = 1, max_groups: int = 32) -> dict[str, list[nn.Module]]:
    """Group the submodules of ``module`` at path length ``depth`` into the groups of :func:`group_parameters`.

    The modules of a group are the submodules whose path has exactly ``depth`` components, plus leaves with shorter
    paths (a ``ReLU`` at depth 1 when ``depth=2``). A module without parameters (an activation, a dropout) joins the
    group of the module with parameters registered before it, so a flat ``Sequential(Linear, ReLU, Linear, ...)``
    gives one group per ``Linear`` + ``ReLU`` pair, named like its ``grad/norm/<layer>`` and capped the same way.
    Only parameter-free modules registered before any parameter get groups of their own. This is what forward hooks
    should be put on. The root module itself is never listed.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
        >>> {k: [type(m).__name__ for m in v] for k, v in group_modules(net, depth=1).items()}
        {'0': ['Linear', 'ReLU'], '2': ['Sequential']}
        >>> {k: [type(m).__name__ for m in v] for k, v in group_modules(net, depth=2).items()}
        {'0': ['Linear', 'ReLU'], '2.0': ['Linear', 'Tanh']}
        >>> deep = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(2, 2), nn.ReLU())])
        >>> {k: len(v) for k, v in group_modules(deep, depth=1, max_groups=2).items()}
        {'0': 2, 'other': 4}
    """
    _check(depth, max_groups)
    names = [clean_name(name) for name, _ in module.named_parameters()]
    final = cap_groups([group_of(name.rpartition(".")[0], depth) for name in names], max_groups)
    out: dict[str, list[nn.Module]] = {}
    current: str | None = None
    for raw_path, sub in module.named_modules():
        # a wrapper (FSDP1, activation checkpointing) stands for the module it wraps: that one is not hooked again
        if not raw_path or raw_path.rpartition(".")[2] in WRAPPER_PARTS:
            continue
        path = clean_name(raw_path)
        n = len(path.split("."))
        if not (n == depth or (n < depth and _is_leaf(sub))):
            continue
        raw = group_of(path, depth)
        if raw in final:
            current = final[raw]
        out.setdefault(current if current is not None else raw, []).append(sub)
    return out


def host_floats(parts: Sequence[Tensor]) -> list[float]:
    """Concatenate tensors (any shapes) on their device and move them to the host in ONE transfer (flush only).

    Float64 where the device has it (not on MPS), so integer counters and steps stay exact.

    Parts of one dtype on one device (a flush of per-step losses: tens of 0-d tensors) are joined first and
    converted once: two kernels instead of two per part (~0.6 ms less for 50 losses on the CPU).

    Example:
        >>> host_floats([torch.tensor(1.5), torch.tensor([2, 3]), torch.tensor([True])])
        [1.5, 2.0, 3.0, 1.0]
        >>> host_floats([torch.tensor(2**53 + 1), torch.tensor([7])])  # int64 -> float64 as each value would be
        [9007199254740992.0, 7.0]
    """
    if not parts:
        return []
    device = parts[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    first = parts[0].dtype
    if all(p.dtype == first and p.device == device for p in parts):  # one dtype, one device: join, convert once
        scalars = all(p.ndim == 0 for p in parts)
        joined = torch.stack(list(parts)) if scalars else torch.cat([p.reshape(-1) for p in parts])
        return [float(x) for x in joined.detach().to(dtype).cpu().tolist()]  # flush: the one host transfer
    flat = [p.detach().reshape(-1).to(dtype) for p in parts]
    flat = [f if f.device == device else f.to(device) for f in flat]  # model-parallel only: device-to-device copy
    return [float(x) for x in torch.cat(flat).cpu().tolist()]  # flush: the one host transfer


__all__ = [
    "OTHER_GROUP",
    "ROOT_GROUP",
    "WRAPPER_PARTS",
    "cap_groups",
    "clean_name",
    "group_modules",
    "group_of",
    "group_parameters",
    "host_floats",
    "safe_tag",
]
