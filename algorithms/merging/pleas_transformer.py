"""PLeaS for decoder-only transformers of the Llama family (Llama, Mistral, Qwen2 layouts in HF
transformers: ``model.embed_tokens``, ``model.layers[i].{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}``, ``model.norm``, ``lm_head``).

The permutation symmetries of such a model, each matched by activation correlation (step 1):
- the residual stream: one permutation of the hidden dimension for the whole model (it touches
  the embeddings, every norm, every projection reading from or writing to the stream), matched on
  the hidden states at every layer boundary; fully matched (the merged hidden size is the inputs');
- per attention block: a permutation of the key/value heads (each with its group of query heads
  under grouped-query attention) and, per head, of the value dimensions; matched on the inputs of
  ``o_proj``. Query/key dimensions are not permuted: rotary embeddings rotate fixed pairs of them;
- per MLP block: the intermediate units (rows of gate/up, columns of down), matched on the inputs
  of ``down_proj``, partially: ``target_width`` sets the merged intermediate size as for the MLPs.

The RMSNorm weights are first folded into the projections that read the normalised stream
(W diag(g), g := 1), which leaves each model's function unchanged and makes every remaining
weight a linear layer between permuted features. Step 2 is then the same closed-form grouped least
squares as for the MLPs, layer by layer, from the permuted inputs of the originals (mean of
merged pairs) to their permuted outputs, except that a projection reading a normalised stream
reads the normalised *merged* stream (the mean of the two permuted streams, then RMS-normalised,
as the merged model will compute it; the mean of two normalised streams has a smaller norm); the
embeddings are the mean of the permuted embeddings (the least-squares solution for one-hot
inputs) and ``lm_head`` fits the mean of both models' logits. ``propagate=True`` then refits every
projection, in forward order, on the merged model's own inputs. Not covered: tied input/output
embeddings, GPT-2's fused Conv1D layout.
"""

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from algorithms.merging.base import Batch
from algorithms.merging.pleas_lstsq import solve_grouped
from algorithms.merging.pleas_match import UnitMatch, correlation, match_units


def is_llama_like(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not hasattr(model, "lm_head"):
        return False
    first = layers[0]
    return all(hasattr(first, a) for a in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")) and all(
        hasattr(first.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ) and all(hasattr(first.mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))  # fmt: skip


# ---- folding the norms -------------------------------------------------------------------------


def fold_norms(model: nn.Module) -> nn.Module:
    """A copy whose RMSNorm weights are folded into the projections that read the normalised stream."""
    if model.lm_head.weight is model.model.embed_tokens.weight:  # type: ignore[union-attr]
        raise ValueError("pleas: tied input/output embeddings are not supported for transformers")
    out = copy.deepcopy(model)
    inner = out.model
    with torch.no_grad():
        for layer in inner.layers:  # type: ignore[union-attr]
            for norm, readers in (
                (layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
            ):
                _fold(norm, readers)
        _fold(inner.norm, (out.lm_head,))  # type: ignore[union-attr,arg-type]
    return out


def _fold(norm: nn.Module, readers: Sequence[nn.Module]) -> None:
    g = getattr(norm, "weight", None)
    if g is None:
        return
    if getattr(norm, "bias", None) is not None:
        raise ValueError("pleas: norms with a bias (LayerNorm) are not supported for transformers")
    for lin in readers:
        assert isinstance(lin, nn.Linear)
        lin.weight.mul_(g.to(lin.weight.dtype))
    g.fill_(1.0)


# ---- activations ---------------------------------------------------------------------------------


@dataclass
class Activations:
    lin_in: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # Linear name -> [rows x in]
    lin_out: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    resid: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # boundary -> [rows x hidden]
    norm_in: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # RMSNorm name -> its input

    def cat(self) -> "Activations":
        parts = (self.lin_in, self.lin_out, self.resid, self.norm_in)
        return Activations(*({k: [torch.cat(v)] for k, v in d.items()} for d in parts))


def _kwargs(item: Batch) -> dict[str, torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return {"input_ids": item}
    if isinstance(item, list | tuple) and item and isinstance(item[0], torch.Tensor):
        return {"input_ids": item[0]}
    if isinstance(item, dict):
        return {k: v for k, v in item.items() if k in ("input_ids", "attention_mask")}
    raise ValueError(f"pleas: a data item must be token ids, a tuple of them or a dict, got {type(item).__name__}")


def _run_masked(model: nn.Module, batches: Sequence[Batch], mask: list[torch.Tensor]) -> None:
    """Run ``model`` in eval mode over the batches; before each, ``mask[0]`` is set to the batch's
    flattened attention mask (all tokens when it has none) for the hooks to select rows with."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in batches:
                kw = _kwargs(item)
                am = kw.get("attention_mask")
                n = kw["input_ids"].numel()
                mask[:] = [am.reshape(-1).bool() if am is not None else torch.ones(n, dtype=torch.bool)]
                model(**kw)
    finally:
        model.train(was)


def capture(model: nn.Module, batches: Sequence[Batch]) -> Activations:
    """Inputs/outputs of every Linear and the residual stream at every layer boundary, one row per
    (unmasked) token."""
    acts = Activations()
    mask: list[torch.Tensor] = []

    def rows(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1, t.shape[-1]).double()
        return flat[mask[0]]

    def linear_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            acts.lin_in.setdefault(name, []).append(rows(args[0]))
            acts.lin_out.setdefault(name, []).append(rows(out))

        return hook

    def resid_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: object, out: object) -> None:
            t = out[0] if isinstance(out, tuple) else out
            assert isinstance(t, torch.Tensor)
            acts.resid.setdefault(name, []).append(rows(t))

        return hook

    def norm_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            acts.norm_in.setdefault(name, []).append(rows(args[0]))

        return hook

    handles = [m.register_forward_hook(linear_hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    norms = dict(reader_norms(model).values())  # each norm once (it has several readers)
    handles += [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
    inner = model.model
    handles.append(inner.embed_tokens.register_forward_hook(resid_hook("embed")))  # type: ignore[union-attr]
    for i, layer in enumerate(inner.layers):  # type: ignore[union-attr,arg-type]
        handles.append(layer.register_forward_hook(resid_hook(f"layer{i}")))
    try:
        _run_masked(model, batches, mask)
    finally:
        for h in handles:
            h.remove()
    return acts.cat()


def reader_norms(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Linear name -> (name, module) of the RMSNorm whose output it reads."""
    out: dict[str, tuple[str, nn.Module]] = {}
    inner: Any = model.model
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[p + "self_attn." + proj] = (p + "input_layernorm", layer.input_layernorm)
        for proj in ("gate_proj", "up_proj"):
            out[p + "mlp." + proj] = (p + "post_attention_layernorm", layer.post_attention_layernorm)
    out["lm_head"] = ("model.norm", inner.norm)
    return out


def rms_normalise(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """What a (folded, weight-one) RMSNorm outputs for x."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)) or 1e-6)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---- matching ------------------------------------------------------------------------------------


def full_match(cost: torch.Tensor) -> UnitMatch:
    """Every unit merged with its best partner (maximal total ``cost``), in A's unit order."""
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    empty = torch.zeros(0, dtype=torch.long)
    return UnitMatch(torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long), empty, empty)


def match_heads(
    fa: torch.Tensor, fb: torch.Tensor, n_kv: int, rep: int, hd: int
) -> tuple[UnitMatch, UnitMatch, torch.Tensor]:
    """Key/value-head permutation, with a value-dimension permutation per head, from the ``o_proj``
    inputs (rows x n_kv*rep*hd: each query head's attention output). Returns the matches of the
    o_proj input features and of the v_proj outputs (n_kv*hd), and B's kv head for each of A's."""
    ca = fa.reshape(-1, n_kv, rep, hd)
    cb = fb.reshape(-1, n_kv, rep, hd)
    score = torch.zeros(n_kv, n_kv, dtype=torch.float64)
    dims: dict[tuple[int, int], torch.Tensor] = {}
    for ga in range(n_kv):
        for gb in range(n_kv):
            c = sum(correlation(ca[:, ga, r], cb[:, gb, r]) for r in range(rep))
            assert isinstance(c, torch.Tensor)
            m = full_match(c)  # m.pairs_a is 0..hd-1
            dims[ga, gb] = m.pairs_b
            score[ga, gb] = c[m.pairs_a, m.pairs_b].sum()
    heads_b = full_match(score).pairs_b  # A's kv head g <-> B's heads_b[g]
    o_in_b = torch.cat([(int(heads_b[g]) * rep + r) * hd + dims[g, int(heads_b[g])]
                        for g in range(n_kv) for r in range(rep)])  # fmt: skip
    v_b = torch.cat([int(heads_b[g]) * hd + dims[g, int(heads_b[g])] for g in range(n_kv)])
    empty = torch.zeros(0, dtype=torch.long)
    return (
        UnitMatch(torch.arange(n_kv * rep * hd), o_in_b, empty, empty),
        UnitMatch(torch.arange(n_kv * hd), v_b, empty, empty),
        heads_b,
    )


def head_match(heads_b: torch.Tensor, per_group: int, hd: int) -> UnitMatch:
    """The match of q (per_group = rep heads per kv group) or k (per_group = 1) outputs: whole
    heads follow their kv group, dimensions within a head stay in place."""
    n_kv = len(heads_b)
    b = torch.cat([int(heads_b[g]) * per_group * hd + torch.arange(per_group * hd) for g in range(n_kv)])
    empty = torch.zeros(0, dtype=torch.long)
    return UnitMatch(torch.arange(n_kv * per_group * hd), b, empty, empty)


# ---- the merge -----------------------------------------------------------------------------------


def merge_llama_like(
    a: nn.Module,
    b: nn.Module,
    data: Iterable[Batch],
    *,
    target_width: float,
    ridge: float,
    propagate: bool = False,
) -> tuple[nn.Module, dict[str, UnitMatch], dict[str, float]]:
    """The merged model, the matches (by name) and each layer's relative least-squares error.

    ``propagate``: after the fit above, refit every projection in forward order on the merged
    model's own inputs (same targets), so that each layer corrects the errors of those below it."""
    cfg: Any = a.config
    fa_model: Any = fold_norms(a)
    fb_model: Any = fold_norms(b)
    batches = list(data)
    if not batches:
        raise ValueError("pleas: data is empty")
    acts_a, acts_b = capture(fa_model, batches), capture(fb_model, batches)
    matches = _match_units(cfg, fa_model, acts_a, acts_b, target_width)

    new_cfg = copy.deepcopy(cfg)
    new_cfg.intermediate_size = matches["model.layers.0.mlp"].width
    ref = next(a.parameters())
    merged = type(a)(new_cfg).to(dtype=ref.dtype, device=ref.device)
    state, errors = _fit_projections(fa_model, matches, acts_a, acts_b, ridge)
    emb_a = fa_model.model.embed_tokens.weight.detach().double()
    emb_b = fb_model.model.embed_tokens.weight.detach().double()
    state["model.embed_tokens.weight"] = matches["residual"].embed(emb_a, emb_b)
    own = merged.state_dict()
    for k, v in own.items():
        if k not in state:
            if not k.endswith("norm.weight"):
                raise ValueError(f"pleas: no rule for the transformer's parameter {k!r}")
            state[k] = torch.ones_like(v)  # folded norms
    merged.load_state_dict({k: v.to(dtype=own[k].dtype) for k, v in state.items()}, strict=True)
    if propagate:
        errors.update(_refit_in_order(merged, matches, acts_a, acts_b, batches, ridge))
    merged.train(a.training)
    return merged, matches, errors


def _match_units(cfg: Any, fa_model: Any, acts_a: Any, acts_b: Any, target_width: float) -> dict[str, UnitMatch]:
    """The residual stream's match, every layer's head and MLP matches, the vocabulary's."""
    n_heads: int = cfg.num_attention_heads
    n_kv: int = getattr(cfg, "num_key_value_heads", None) or n_heads
    hd: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rep = n_heads // n_kv
    matches: dict[str, UnitMatch] = {}
    resid_cost = sum(correlation(acts_a.resid[k][0], acts_b.resid[k][0]) for k in acts_a.resid)
    assert isinstance(resid_cost, torch.Tensor)
    matches["residual"] = full_match(resid_cost)
    inter: int = cfg.intermediate_size
    width = min(2 * inter, max(1, round(target_width * inter)))
    for i in range(len(fa_model.model.layers)):
        p = f"model.layers.{i}."
        o_in, v_out, heads_b = match_heads(
            acts_a.lin_in[p + "self_attn.o_proj"][0], acts_b.lin_in[p + "self_attn.o_proj"][0], n_kv, rep, hd
        )
        matches[p + "attn"], matches[p + "v"] = o_in, v_out
        matches[p + "q"], matches[p + "k"] = head_match(heads_b, rep, hd), head_match(heads_b, 1, hd)
        mlp_a, mlp_b = acts_a.lin_in[p + "mlp.down_proj"][0], acts_b.lin_in[p + "mlp.down_proj"][0]
        matches[p + "mlp"] = match_units(mlp_a, mlp_b, width)
    matches["vocab"] = UnitMatch.identity(fa_model.lm_head.out_features)
    return matches


def _io(matches: dict[str, UnitMatch], name: str) -> tuple[UnitMatch, UnitMatch]:
    """The input and output matches of the linear layer ``name``."""
    resid = matches["residual"]
    if name == "lm_head":
        return resid, matches["vocab"]
    p, _, leaf = name.rpartition(".")
    layer = p.rpartition(".")[0] + "."
    return {
        "q_proj": (resid, matches[layer + "q"]),
        "k_proj": (resid, matches[layer + "k"]),
        "v_proj": (resid, matches[layer + "v"]),
        "o_proj": (matches[layer + "attn"], resid),
        "gate_proj": (resid, matches[layer + "mlp"]),
        "up_proj": (resid, matches[layer + "mlp"]),
        "down_proj": (matches[layer + "mlp"], resid),
    }[leaf]


def _fit(x: torch.Tensor, y: torch.Tensor, m_in: UnitMatch, m_out: UnitMatch, ridge: float,
         has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The grouped least-squares weights (and bias) from ``x`` to ``y``, and the relative error."""
    w, bias = solve_grouped(x, y, m_in.groups(), m_out.groups(), ridge, has_bias)
    pred = x @ w.T + (bias if bias is not None else 0.0)
    return w, bias, float(((pred - y) ** 2).sum() / (y**2).sum().clamp(min=1e-30))


def _fit_projections(fa_model: Any, matches: dict[str, UnitMatch], acts_a: Any, acts_b: Any,
                     ridge: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every linear layer fitted on the merged (embedded) activations of both models."""
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    readers = reader_norms(fa_model)
    for name, mod in fa_model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        m_in, m_out = _io(matches, name)
        if name in readers:  # the merged stream (mean of the permuted streams), then normalised
            norm_name, norm = readers[name]
            x = rms_normalise(m_in.embed(acts_a.norm_in[norm_name][0], acts_b.norm_in[norm_name][0]), norm)
        else:
            x = m_in.embed(acts_a.lin_in[name][0], acts_b.lin_in[name][0])
        y = m_out.embed(acts_a.lin_out[name][0], acts_b.lin_out[name][0])
        w, bias, errors[name] = _fit(x, y, m_in, m_out, ridge, mod.bias is not None)
        state[name + ".weight"] = w
        if bias is not None:
            state[name + ".bias"] = bias
    return state, errors


def _refit_in_order(merged: nn.Module, matches: dict[str, UnitMatch], acts_a: Any, acts_b: Any,
                    batches: Sequence[Batch], ridge: float) -> dict[str, float]:
    """Each projection refitted, in forward order, on the merged model's own inputs."""
    errors: dict[str, float] = {}
    for name, mod in merged.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        m_in, m_out = _io(matches, name)
        x = _inputs_of(merged, mod, batches)
        y = m_out.embed(acts_a.lin_out[name][0], acts_b.lin_out[name][0])
        w, bias, errors[name] = _fit(x, y, m_in, m_out, ridge, mod.bias is not None)
        with torch.no_grad():
            mod.weight.copy_(w.to(mod.weight.dtype))
            if bias is not None and mod.bias is not None:
                mod.bias.copy_(bias.to(mod.bias.dtype))
    return errors


def _inputs_of(model: nn.Module, module: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """``module``'s inputs (one row per unmasked token) when ``model`` runs on the batches."""
    got: list[torch.Tensor] = []
    mask: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        got.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()[mask[0]])

    handle = module.register_forward_hook(hook)
    try:
        _run_masked(model, batches, mask)
    finally:
        handle.remove()
    return torch.cat(got)
