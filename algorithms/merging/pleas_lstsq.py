"""PLeaS step 2 (Nasery et al. 2024, sec. 3.2), in closed form.

For each weight layer, the merged weights minimise the squared error between the merged layer's
output on its inputs and the permuted outputs of both original layers:

    W* = argmin_W  sum_{i in {A, B}} || X W - P_i Y_i ||^2 + lam ||W||^2

where X holds the merged layer's inputs (the permuted inputs of the originals, or the merged model's
own ones) and P_i Y_i the originals' pre-activation outputs mapped to the merged units. For a merged
pair both targets count, so the optimum fits their mean; an A-only unit fits A alone. As in the
authors' code, weights from A-only inputs to B-only outputs (and B-only to A-only) are held at
zero, so each group of output units is its own least-squares problem over the allowed columns.

The authors' code reaches this optimum with Adam on the per-layer MSE; here it is solved exactly
through the normal equations (X^T X + lam I) W = X^T Y, in float64. With lam = 0 a minimum-norm
solution of the normal equations is returned (``torch.linalg.lstsq`` on X^T X), which is an exact
least-squares optimum even when X is rank deficient.
"""

import torch
import torch.nn.functional as F
from torch import nn


def least_squares(
    x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0, fit_bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,)) minimising ||x w^T + b - y||^2 + lam ||w||^2 (bias not penalised),
    lam = ridge * mean diagonal of x^T x."""
    w_all = solve_normal_equations(gram(x, fit_bias), cross(x, y, fit_bias), ridge, fit_bias)
    if fit_bias:
        return w_all[:-1].T.contiguous(), w_all[-1].contiguous()
    return w_all.T.contiguous(), None


def design(x: torch.Tensor, fit_bias: bool) -> torch.Tensor:
    x = x.double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1) if fit_bias else x


def gram(x: torch.Tensor, fit_bias: bool) -> torch.Tensor:
    xd = design(x, fit_bias)
    return xd.T @ xd


def cross(x: torch.Tensor, y: torch.Tensor, fit_bias: bool) -> torch.Tensor:
    return design(x, fit_bias).T @ y.double()


def solve_normal_equations(g: torch.Tensor, xty: torch.Tensor, ridge: float, fit_bias: bool) -> torch.Tensor:
    n = g.shape[0]
    if ridge > 0:
        n_w = n - 1 if fit_bias else n
        lam = ridge * (torch.diagonal(g)[:n_w].mean() if n_w > 0 else g.new_tensor(0.0))
        reg = torch.zeros(n, dtype=g.dtype, device=g.device)
        reg[:n_w] = lam
        g = g + torch.diag(reg)
        try:
            return torch.linalg.solve(g, xty)
        except RuntimeError:  # singular even with the ridge (e.g. a constant column with no bias)
            pass
    return torch.linalg.lstsq(g, xty, driver="gelsd" if g.device.type == "cpu" else None).solution


def design_rows(layer: nn.Linear | nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its weight: the inputs themselves for Linear, the unfolded
    patches (N * positions, C_in * kh * kw) for Conv2d."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    if isinstance(layer.padding, str):
        raise ValueError("pleas: Conv2d with string padding is not supported (give the padding in pixels)")
    cols = F.unfold(
        inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
    )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def target_rows(outputs: torch.Tensor) -> torch.Tensor:
    """(N * positions, units) from (N, units) or (N, units, H, W)."""
    return outputs if outputs.dim() == 2 else outputs.movedim(1, -1).reshape(-1, outputs.shape[1])


def solve_grouped(
    x: torch.Tensor,
    y: torch.Tensor,
    in_groups: torch.Tensor,
    out_groups: torch.Tensor,
    ridge: float,
    fit_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least squares per output group: shared outputs (0) see every input column, A-only outputs (1)
    see shared and A-only columns, B-only outputs (2) see shared and B-only columns."""
    g_full, xty_full = gram(x, fit_bias), cross(x, y, fit_bias)
    n_in = x.shape[1]
    weight = torch.zeros(y.shape[1], n_in, dtype=torch.float64, device=x.device)
    bias = torch.zeros(y.shape[1], dtype=torch.float64, device=x.device) if fit_bias else None
    for g in (0, 1, 2):
        rows = (out_groups == g).nonzero().flatten()
        if len(rows) == 0:
            continue
        allowed = torch.ones(n_in, dtype=torch.bool) if g == 0 else (in_groups == 0) | (in_groups == g)
        cols = allowed.nonzero().flatten()
        idx = torch.cat([cols, torch.tensor([n_in])]) if fit_bias else cols
        sol = solve_normal_equations(g_full[idx][:, idx], xty_full[idx][:, rows], ridge, fit_bias)
        weight[rows.unsqueeze(1), cols.unsqueeze(0)] = sol[: len(cols)].T
        if bias is not None:
            bias[rows] = sol[-1]
    return weight, bias
