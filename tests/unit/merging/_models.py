"""Small models shared by the merging tests."""

import copy
from typing import Any

import torch
from torch import nn


def digits_mlp(h1: int = 32, h2: int = 24) -> nn.Sequential:
    """The built-in digits MLP's layout."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


def digits_cnn(c1: int = 8, c2: int = 12, hidden: int = 20) -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def permuted_copy(model: nn.Sequential, seed: int = 1) -> nn.Sequential:
    """The same function with the units of every hidden layer randomly permuted."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    layers = [m for m in out if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        for cur, nxt in zip(layers[:-1], layers[1:], strict=True):
            d = cur.weight.shape[0]
            p = torch.randperm(d, generator=gen)
            cur.weight.copy_(cur.weight[p])
            assert cur.bias is not None
            cur.bias.copy_(cur.bias[p])
            if isinstance(nxt, nn.Linear) and nxt.in_features != d:  # Linear after Flatten of conv maps
                s = nxt.in_features // d
                nxt.weight.copy_(nxt.weight.view(nxt.out_features, d, s)[:, p].reshape(nxt.out_features, -1))
            else:
                nxt.weight.copy_(nxt.weight[:, p])
    return out


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0 if atol == 0.0 else 1e-6, msg=k)


def tiny_llama(seed: int = 0, intermediate: int = 24, kv_heads: int = 2) -> nn.Module:
    """A Llama-family causal LM from a config (no download): hidden 16, 4 heads, 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights, so that folding them is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def permuted_llama(model: nn.Module, seed: int = 1) -> nn.Module:
    """The same function with every symmetry PLeaS matches permuted at random: the residual
    stream, each MLP's intermediate units, each attention block's key/value heads (with their query
    heads) and each head's value dimensions."""
    gen = torch.Generator().manual_seed(seed)
    out: Any = copy.deepcopy(model)
    cfg = out.config
    d, inter = cfg.hidden_size, cfg.intermediate_size
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, rep = d // n_heads, n_heads // n_kv
    p = torch.randperm(d, generator=gen)
    with torch.no_grad():
        emb = out.model.embed_tokens.weight
        emb.copy_(emb[:, p])
        out.model.norm.weight.copy_(out.model.norm.weight[p])
        out.lm_head.weight.copy_(out.lm_head.weight[:, p])
        for layer in out.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(norm.weight[p])
            for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(lin.weight[:, p])
            for lin in (att.o_proj, mlp.down_proj):
                lin.weight.copy_(lin.weight[p])
            q = torch.randperm(inter, generator=gen)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[q])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[q])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, q])
            sigma = torch.randperm(n_kv, generator=gen)
            pis = [torch.randperm(hd, generator=gen) for _ in range(n_kv)]
            heads = [(int(sigma[g]) * rep + r) * hd for g in range(n_kv) for r in range(rep)]
            q_rows = torch.cat([h + torch.arange(hd) for h in heads])
            k_rows = torch.cat([int(sigma[g]) * hd + torch.arange(hd) for g in range(n_kv)])
            v_rows = torch.cat([int(sigma[g]) * hd + pis[g] for g in range(n_kv)])
            o_cols = torch.cat([(int(sigma[g]) * rep + r) * hd + pis[g] for g in range(n_kv) for r in range(rep)])
            att.q_proj.weight.copy_(att.q_proj.weight[q_rows])
            att.k_proj.weight.copy_(att.k_proj.weight[k_rows])
            att.v_proj.weight.copy_(att.v_proj.weight[v_rows])
            att.o_proj.weight.copy_(att.o_proj.weight[:, o_cols])
    return out  # type: ignore[no-any-return]


def make_merger(name: str, context: Any = None, **fields: Any) -> Any:
    """The merger of method ``name`` with ``fields`` (validated by its config); ``inputs`` are the
    references the worker would resolve, so any two names do here unless a test gives its own."""
    from algorithms.merging.base import MergeContext
    from algorithms.merging.registry import MERGERS

    cfg = MERGERS.config(name, **{"inputs": ["a", "b"], **fields})
    return MERGERS.build(cfg, context or MergeContext())
