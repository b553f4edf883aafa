"""LoRA-Pro: the adjusted gradients' equivalent gradient is the best approximation of the full one."""

import numpy as np
import scipy.linalg
import torch

from algorithms.peft.lora_pro import lora_pro_gradients, solve_sylvester_spd
from algorithms.peft.registry import apply
from tests.unit.peft.helpers import TinyMLP, mlp_batch


def test_sylvester_matches_scipy() -> None:
    g = torch.Generator().manual_seed(0)
    P = torch.randn(4, 4, generator=g, dtype=torch.float64)
    Q = torch.randn(4, 4, generator=g, dtype=torch.float64)
    P, Q = P @ P.T + torch.eye(4, dtype=torch.float64), Q @ Q.T
    C = torch.randn(4, 4, generator=g, dtype=torch.float64)
    X = solve_sylvester_spd(P, Q, C)
    np.testing.assert_allclose(X.numpy(), scipy.linalg.solve_sylvester(P.numpy(), Q.numpy(), C.numpy()),
                               atol=1e-10)
    Xb = solve_sylvester_spd(torch.stack([P, P]), torch.stack([Q, Q]), torch.stack([C, 2 * C]))
    np.testing.assert_allclose(Xb[1].numpy(), 2 * X.numpy(), atol=1e-10)


def test_equivalent_gradient_closer_to_full_gradient() -> None:
    torch.manual_seed(0)
    handle = apply("lora_pro", TinyMLP(), r=2, alpha=4.0, target_modules=["fc1", "fc2"])
    pairs = handle.pairs  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in pairs:  # B = 0 at init would make the comparison trivial
            p.B.normal_(0, 0.3)
    batch = mlp_batch()
    # full gradient dL/dW at the same point W' = W0 + s B A (equal to dL/dW0)
    for p in pairs:
        p.base_weight.requires_grad_(True)
    handle.model(**batch)["loss"].backward()
    full = [p.base_weight.grad.clone() for p in pairs]
    plain = [p.scaling * (p.B @ p.A.grad + p.B.grad @ p.A) for p in pairs]
    handle.after_backward(0, handle.model)
    for p, g, g_plain in zip(pairs, full, plain, strict=True):
        A, B, s = p.A.detach(), p.B.detach(), p.scaling
        adjusted = s * (B @ p.A.grad + p.B.grad @ A)
        assert torch.linalg.norm(adjusted - g) < 0.9 * torch.linalg.norm(g_plain - g)
        # Theorem 2.2: it is the projection of g on the tangent space at BA
        PB = B @ torch.linalg.pinv(B)
        PA = torch.linalg.pinv(A) @ A
        target = PB @ g + (torch.eye(len(PB)) - PB) @ g @ PA
        torch.testing.assert_close(adjusted, target, atol=1e-4, rtol=1e-3)


def test_x_is_the_theorem_2_3_minimiser() -> None:
    """Among all optimal (g^A, g^B) the chosen X is closest to the LoRA gradients."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 9, generator=g, dtype=torch.float64)
    B = torch.randn(7, 3, generator=g, dtype=torch.float64)
    G = torch.randn(7, 9, generator=g, dtype=torch.float64)
    s = 1.7
    gA, gB = s * B.T @ G, s * G @ A.T
    new_A, new_B = lora_pro_gradients(A, B, gA, gB, s, damping=1e-12)

    def dist(dX: torch.Tensor) -> float:
        return float(((new_A + dX @ A - gA) ** 2).sum() + ((new_B - B @ dX - gB) ** 2).sum())

    base = dist(torch.zeros(3, 3, dtype=torch.float64))
    for _ in range(20):
        assert dist(1e-3 * torch.randn(3, 3, generator=g, dtype=torch.float64)) > base


def test_b_zero_is_handled() -> None:
    torch.manual_seed(0)
    handle = apply("lora_pro", TinyMLP(), r=2, alpha=4.0, target_modules=["fc1"])
    handle.model(**mlp_batch())["loss"].backward()
    handle.after_backward(0, handle.model)
    for p in handle.pairs:  # type: ignore[attr-defined]
        assert torch.isfinite(p.A.grad).all() and torch.isfinite(p.B.grad).all()
