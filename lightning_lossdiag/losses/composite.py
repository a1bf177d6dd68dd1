"""A multi-task loss: named terms, each a loss over one output head of the model, weighted and summed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_lossdiag.losses._build import build_loss
from lightning_lossdiag.losses._checks import check_number
from lightning_lossdiag.losses._errors import LossConfigError
from lightning_lossdiag.losses._registry import register_loss

_WEIGHTINGS = ("static", "uncertainty")
TERM_KEYS: tuple[str, ...] = ("loss", "output", "target", "weight")


def _keys(mapping: Mapping[str, Any]) -> str:
    return ", ".join(map(repr, mapping)) or "none"


@register_loss(
    "composite",
    aliases=("CompositeLoss", "multitask"),
    summary="Weighted sum of named losses over the heads of a multi-output model (static or learned weights).",
    task="multitask",
)
class CompositeLoss(nn.Module):
    r"""Sum of named loss terms, each computed on one output head and one target of a multi-task model.

    A term is a mapping ``{"loss": <spec>, "output": <key in preds>, "target": <key in target>, "weight": w}``;
    ``output`` and ``target`` default to the term's name, ``weight`` to 1. The loss spec is anything
    :func:`~lightning_lossdiag.losses.build_loss` accepts. With :math:`L_i` the value of term :math:`i`:

    * ``weighting="static"``: :math:`L = \sum_i w_i L_i`.
    * ``weighting="uncertainty"`` (Kendall, Gal & Cipolla, 2018, homoscedastic uncertainty): one learnable
      log-variance :math:`s_i` per term (``self.log_vars``, an ``nn.Parameter`` initialised to 0, trained with the
      model when the criterion is a submodule of the LightningModule) and

      .. math:: L = \sum_i \left( e^{-s_i} L_i + s_i \right)

      The effective weight of term :math:`i` is :math:`e^{-s_i}`; the :math:`+ s_i` keeps it from collapsing to 0.
      Static weights are not used in this mode (a ``weight`` other than 1 raises).

    After each forward, ``last_terms`` maps each term name to its detached, unweighted value (the mixin logs them as
    ``<stage>/loss/<term>``).

    In YAML::

        loss:
          name: composite
          weighting: static
          terms:
            ctr: {loss: bce_with_logits, weight: 0.7}
            cvr: {loss: {name: focal, gamma: 2.0}, output: cvr_logit, target: cvr, weight: 0.3}

    Args:
        terms: term name -> term mapping (a bare loss spec is taken as ``{"loss": spec}``).
        weighting: ``"static"`` or ``"uncertainty"``.

    Example:
        >>> loss = CompositeLoss({"a": {"loss": "mse", "weight": 2.0}, "b": {"loss": "l1"}})
        >>> loss({"a": torch.ones(2), "b": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.ones(2)})
        tensor(3.)
        >>> loss.last_terms
        {'a': tensor(1.), 'b': tensor(1.)}
    """

    log_vars: nn.Parameter | None

    def __init__(
        self, terms: Mapping[str, Mapping[str, Any]], weighting: Literal["static", "uncertainty"] = "static"
    ) -> None:
        super().__init__()
        if weighting not in _WEIGHTINGS:
            raise LossConfigError(f"`weighting` must be one of 'static', 'uncertainty', got {weighting!r}")
        if not isinstance(terms, Mapping) or len(terms) == 0:
            raise LossConfigError(
                f"`terms` must be a non-empty mapping of term name -> {{loss, output, target, weight}}, got {terms!r}"
            )
        self.weighting = weighting
        self.losses = nn.ModuleDict()
        self.output_keys: dict[str, str] = {}
        self.target_keys: dict[str, str] = {}
        self.weights: dict[str, float] = {}
        for name, term in terms.items():
            self._add_term(name, term)
        self.names: tuple[str, ...] = tuple(self.output_keys)
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(self.names)))
        else:
            self.register_parameter("log_vars", None)
        self.last_terms: dict[str, Tensor] = {}

    def _add_term(self, name: Any, term: Any) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise LossConfigError(f"term names must be non-empty strings without '.', got {name!r}")
        if isinstance(term, (str, nn.Module)):
            term = {"loss": term}
        if not isinstance(term, Mapping):
            raise LossConfigError(
                f"term {name!r} must be a mapping with keys {', '.join(TERM_KEYS)}, got {type(term).__name__}"
            )
        unknown = [k for k in term if k not in TERM_KEYS]
        if unknown:
            raise LossConfigError(
                f"term {name!r} has unknown key(s) {', '.join(map(repr, unknown))}; accepted keys: "
                f"{', '.join(TERM_KEYS)} (loss arguments go inside `loss`, e.g. {{name: focal, gamma: 2.0}})"
            )
        if "loss" not in term:
            raise LossConfigError(f"term {name!r} needs a `loss` (a name, a mapping with `name`, or a module)")
        try:
            weight = check_number("weight", term.get("weight", 1.0), low=0.0)
            module = build_loss(term["loss"])
        except LossConfigError as err:
            raise LossConfigError(f"term {name!r}: {err}") from None
        if self.weighting == "uncertainty" and weight != 1.0:
            raise LossConfigError(
                f"term {name!r} has `weight: {weight:g}`, but weighting='uncertainty' learns the weights; remove "
                "`weight` or use weighting='static'"
            )
        for key in ("output", "target"):
            if not isinstance(term.get(key, name), str):
                raise LossConfigError(f"term {name!r}: `{key}` must be a string key, got {term[key]!r}")
        try:
            self.losses[name] = module
        except KeyError as err:
            raise LossConfigError(f"term name {name!r} cannot be used ({err}); choose another name") from None
        self.output_keys[name] = term.get("output", name)
        self.target_keys[name] = term.get("target", name)
        self.weights[name] = weight

    def forward(self, preds: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum of the terms (no host reads); also sets ``last_terms``."""
        for label, value in (("preds", preds), ("target", target)):
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"CompositeLoss needs `{label}` as a mapping of head name -> tensor (terms: "
                    f"{', '.join(self.names)}), got {type(value).__name__}"
                )
        values: dict[str, Tensor] = {}
        contributions: list[Tensor] = []
        for i, name in enumerate(self.names):
            out_key, tgt_key = self.output_keys[name], self.target_keys[name]
            if out_key not in preds:
                raise LossConfigError(
                    f"term {name!r} reads output {out_key!r}, but preds has keys: {_keys(preds)}; "
                    "set the term's `output`"
                )
            if tgt_key not in target:
                raise LossConfigError(
                    f"term {name!r} reads target {tgt_key!r}, but target has keys: {_keys(target)}; "
                    "set the term's `target`"
                )
            value = self.losses[name](preds[out_key], target[tgt_key])
            if value.dim() != 0:
                raise ValueError(
                    f"term {name!r} returned a loss of shape {tuple(value.shape)}; a term must give a scalar "
                    "(use reduction 'mean' or 'sum')"
                )
            values[name] = value
            if self.log_vars is not None:
                s = self.log_vars[i]
                contribution = torch.exp(-s) * value + s
            else:
                contribution = self.weights[name] * value
            contributions.append(contribution)
        self.last_terms = {k: v.detach() for k, v in values.items()}
        total = contributions[0]
        for contribution in contributions[1:]:
            total = total + contribution
        return total

    def term_weights(self) -> dict[str, Tensor]:
        """Current effective weight of each term: ``w_i`` (static) or ``exp(-s_i)`` (uncertainty), detached.

        Example:
            >>> CompositeLoss({"a": "mse"}, weighting="uncertainty").term_weights()
            {'a': tensor(1.)}
        """
        if self.log_vars is not None:
            effective = torch.exp(-self.log_vars.detach())
            return {name: effective[i] for i, name in enumerate(self.names)}
        return {name: torch.tensor(w) for name, w in self.weights.items()}

    def extra_repr(self) -> str:
        """Arguments shown by ``repr``."""
        return f"weighting={self.weighting!r}, weights={self.weights}"


__all__ = ["TERM_KEYS", "CompositeLoss"]
