"""PLeaS: Merging Models with Permutations and Least Squares (Nasery, Hayase, Koh, Oh; CVPR 2025,
arXiv:2407.02447).

Two models of the same architecture (trained from different initialisations, or fine-tuned from
different bases: no common base is needed, ``base`` is ignored) are merged into one model whose
hidden layers have ``target_width`` times the inputs' width:

1. Permutations (sec. 3.1, ``pleas_match``): at every hidden layer the units of A and B are
   matched by activation correlation with a linear assignment; the most aligned pairs are merged,
   the rest of A's and B's units are kept side by side (partial matching sets the merged width).
2. Least squares (sec. 3.2, ``pleas_lstsq``): layer by layer, the merged weights are the
   closed-form least-squares fit from the merged layer's inputs to the permuted pre-activation
   outputs of both originals. The inputs are, as in the paper and its code, the permuted inputs of
   the originals (mean of a merged pair, unmatched units as they are); ``propagate=True`` uses the
   merged model's own inputs instead, so that each layer corrects the errors of the layers below.
   The output layer's units are shared, so the merged logits fit the mean of both models' logits:
   the ensemble that PLeaS approximates.

PLeaS-free (sec. 3.3): the activations come from data outside the fine-tuning domains. Pass such
proxy data as ``data`` with ``data_free=True``; with no data at all, standard-normal inputs of
``input_shape`` stand in (inferred for an MLP whose first weight layer is a Linear).

Covered: ``nn.Sequential`` stacks of Linear/Conv2d with unit-wise operations between them (the
digits MLP and CNN), and decoder-only transformers of the Llama family (``pleas_transformer``:
residual stream, attention heads and MLP units matched block by block). PEFT adapter models are
merged as their dense equivalents (base + adapter delta). Not covered: normalisation layers and
residual blocks in ``nn.Sequential`` models, other transformer layouts.
"""

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from algorithms.merging._state import check_compatible
from algorithms.merging.adapters import unwrap_adapters
from algorithms.merging.base import Batch
from algorithms.merging.config import PleasConfig
from algorithms.merging.pleas_chain import (
    Chain,
    as_units,
    capture,
    parse_chain,
    replace_leaf,
    unit_samples,
    units_out,
)
from algorithms.merging.pleas_lstsq import design_rows, solve_grouped, target_rows
from algorithms.merging.pleas_match import UnitMatch, match_units
from algorithms.merging.pleas_transformer import is_llama_like, merge_llama_like

NOISE_SEED = 0  # PLeaS-free on noise: the same standard-normal (or random-token) inputs every time


class PleasMerger:
    def __init__(self, cfg: PleasConfig, example_shape: Sequence[int] | None = None) -> None:
        """``example_shape``: one example's shape from the task, for PLeaS-free on noise when the
        config gives no ``input_shape``."""
        self.target_width = 1.0 if cfg.target_width is None else float(cfg.target_width)
        self.data_free, self.ridge, self.propagate = cfg.data_free, cfg.ridge, cfg.propagate
        shape = cfg.input_shape if cfg.input_shape is not None else example_shape
        self.input_shape = None if shape is None else list(shape)
        self.noise_samples, self.seed = cfg.noise_samples, NOISE_SEED
        self.matches_: list[UnitMatch] = []
        self.named_matches_: dict[str, UnitMatch] = {}  # transformers: by block
        self.layer_errors_: list[float] = []  # relative squared error of each layer's fit

    def merge(
        self, models: Sequence[nn.Module], base: nn.Module | None = None, data: Iterable[Batch] | None = None
    ) -> nn.Module:
        models, base = unwrap_adapters(models, base)
        if len(models) != 2:
            raise ValueError(f"pleas: merges exactly 2 models, got {len(models)}")
        check_compatible(models)
        a, b = models
        if is_llama_like(a):
            return self._merge_transformer(a, b, data)
        chain_a, chain_b = parse_chain(a), parse_chain(b)
        if [type(m) for m in chain_a.leaves] != [type(m) for m in chain_b.leaves]:
            raise ValueError("pleas: the two models have different layer types")
        x = self._inputs(chain_a, data)
        ins_a, outs_a = capture(chain_a, x)
        ins_b, outs_b = capture(chain_b, x)

        n_layers = len(chain_a.weight_idx)
        self.matches_ = []
        for j in range(n_layers - 1):
            d = units_out(chain_a.weight(j))
            width = min(2 * d, max(1, round(self.target_width * d)))
            fa, fb = unit_samples(ins_a[j + 1], d), unit_samples(ins_b[j + 1], d)
            self.matches_.append(match_units(fa, fb, width))
        self.matches_.append(UnitMatch.identity(units_out(chain_a.weight(n_layers - 1))))

        merged = copy.deepcopy(a)
        chain_m = parse_chain(merged)
        self.layer_errors_ = []
        for j in range(n_layers):
            layer = chain_a.weight(j)
            if j == 0:
                xin = ins_a[0]
                in_groups = torch.zeros(_in_units(layer), dtype=torch.long)
            else:
                m_in = self.matches_[j - 1]
                in_groups = m_in.groups()
                if self.propagate:
                    with torch.no_grad():
                        xin = chain_m.run(x, stop=chain_m.weight_idx[j])
                else:
                    d_in = units_out(chain_a.weight(j - 1))
                    xin = _merged_features(m_in, ins_a[j], ins_b[j], d_in)
            m_out = self.matches_[j]
            d_out = units_out(layer)
            rows = design_rows(layer, xin)
            targets = target_rows(_merged_features(m_out, outs_a[j], outs_b[j], d_out))
            col_groups = in_groups.repeat_interleave(rows.shape[1] // len(in_groups))
            fit_bias = layer.bias is not None
            w, bias = solve_grouped(rows, targets, col_groups, m_out.groups(), self.ridge, fit_bias)
            self.layer_errors_.append(_relative_error(rows, targets, w, bias))
            new = _new_layer(layer, len(in_groups), m_out.width, w, bias)
            replace_leaf(merged, chain_m.names[chain_m.weight_idx[j]], new)
            chain_m.leaves[chain_m.weight_idx[j]] = new
        return merged

    def _merge_transformer(self, a: nn.Module, b: nn.Module, data: Iterable[Batch] | None) -> nn.Module:
        if data is None:
            if not self.data_free:
                raise ValueError("pleas: needs data to match units and fit the layers (or data_free=True)")
            seq = self.input_shape[-1] if self.input_shape else 32
            gen = torch.Generator().manual_seed(self.seed)
            cfg: Any = a.config
            vocab = int(cfg.vocab_size)
            ids = torch.randint(0, vocab, (self.noise_samples, seq), generator=gen)
            data = list(ids.to(next(a.parameters()).device).split(32))
        merged, named, errors = merge_llama_like(
            a, b, data, target_width=self.target_width, ridge=self.ridge, propagate=self.propagate
        )
        self.matches_, self.named_matches_, self.layer_errors_ = [], named, list(errors.values())
        return merged

    def _inputs(self, chain: Chain, data: Iterable[Batch] | None) -> torch.Tensor:
        param = next(iter(chain.weight(0).parameters()))
        if data is not None:
            xs = [_first(item) for item in data]
            if not xs:
                raise ValueError("pleas: data is empty")
            return torch.cat(xs).to(device=param.device, dtype=param.dtype)
        if not self.data_free:
            raise ValueError("pleas: needs data to match units and fit the layers (or data_free=True)")
        shape = self.input_shape or _infer_input_shape(chain)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.noise_samples, *shape, generator=gen).to(
            device=param.device, dtype=param.dtype
        )


def _merged_features(match: UnitMatch, ta: torch.Tensor, tb: torch.Tensor, d: int) -> torch.Tensor:
    """A's and B's features (d units) mapped to the merged units, in the layout of ``ta``."""
    out = match.embed(as_units(ta, d), as_units(tb, d))
    return out if ta.dim() == out.dim() else out.reshape(out.shape[0], -1)


def _in_units(layer: nn.Linear | nn.Conv2d) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _new_layer(
    layer: nn.Linear | nn.Conv2d, in_units: int, out_units: int, w: torch.Tensor, bias: torch.Tensor | None
) -> nn.Module:
    ref = layer.weight
    new: nn.Linear | nn.Conv2d
    if isinstance(layer, nn.Linear):
        in_features = w.shape[1]
        new = nn.Linear(in_features, out_units, bias=bias is not None)
    else:
        new = nn.Conv2d(
            in_units, out_units, layer.kernel_size, layer.stride, layer.padding, layer.dilation,  # type: ignore[arg-type]
            bias=bias is not None,
        )  # fmt: skip
    new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        new.weight.copy_(w.reshape(new.weight.shape))
        if bias is not None:
            assert new.bias is not None
            new.bias.copy_(bias)
    new.train(layer.training)
    return new


def _relative_error(
    rows: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
) -> float:
    pred = rows.double() @ w.T + (bias if bias is not None else 0.0)
    t = targets.double()
    return float(((pred - t) ** 2).sum() / (t**2).sum().clamp(min=1e-30))


def _first(item: Batch) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, list | tuple) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise ValueError(
        f"pleas: a data item must be a tensor or an (inputs, labels) pair, got {type(item).__name__}"
    )


def _infer_input_shape(chain: Chain) -> list[int]:
    first = chain.leaves[chain.weight_idx[0]]
    if isinstance(first, nn.Linear) and all(
        isinstance(m, nn.Flatten | nn.Identity) for m in chain.leaves[: chain.weight_idx[0]]
    ):
        return [first.in_features]
    raise ValueError("pleas: data_free without data needs input_shape (one example's shape)")
