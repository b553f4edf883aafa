"""One-shot codes (Tandon et al. 2017): exhaustive decodability, conditioning, registry, config."""

import itertools
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algorithms.coding import CODES, build, decode_gradient
from algorithms.coding.base import UndecodableError
from algorithms.coding.config import (
    CyclicRepetitionConfig,
    FractionalRepetitionConfig,
    MultiplexedSGCConfig,
    SequentialGCConfig,
)
from algorithms.coding.linalg import condition_number


def _schemes(n: int, s: int) -> list[str]:
    out = ["cyclic_repetition"]
    if n % (s + 1) == 0:
        out.append("fractional_repetition")
    return out


def expected_parts(scheme: str, n: int, s: int, w: int) -> list[int]:
    """Tandon et al.'s supports: the cyclic window w..w+s, or w's block of s + 1."""
    if scheme == "cyclic_repetition":
        return sorted((w + k) % n for k in range(s + 1))
    start = w // (s + 1) * (s + 1)
    return list(range(start, start + s + 1))


@pytest.mark.parametrize("n", range(1, 13))
def test_every_survivor_set_decodes_exactly(n: int) -> None:
    for s in range(n):
        for scheme in _schemes(n, s):
            code = build(scheme, n, s)
            B = code.B
            assert B.shape == (n, n)
            for w in range(n):  # exactly s + 1 parts, where Tandon's schemes put them
                assert code.parts(w) == expected_parts(scheme, n, s, w)
            assert code.load == pytest.approx((s + 1) / n)
            for missing in itertools.combinations(range(n), s):
                alive = [w for w in range(n) if w not in missing]
                a = code.decode(alive)
                assert torch.all(a[list(missing)] == 0)
                torch.testing.assert_close(a @ B, torch.ones(n, dtype=torch.float64), atol=1e-9, rtol=0)
                if scheme == "cyclic_repetition":  # measured worst over all sets: 351 at n = 12
                    assert condition_number(B[alive]) < 1e3


def test_cyclic_code_is_optimal_and_decodes_for_every_accepted_pair_up_to_40() -> None:
    """Every (n, s) with 13 <= n <= 40 that the spec accepts: exactly the s + 1 parts w..w+s per
    worker (load (s + 1) / n, measured from the support), and survivor sets decode: bursts of
    stragglers at four offsets (the worst sets we found: exhaustively for n <= 14, hill climbing
    up to 40) and two random sets. Float64 messages decode to 1e-5 relative; worst condition
    numbers stay below 1e10 (2.8e9 measured at n = 40, s = 20)."""
    gen = torch.Generator().manual_seed(0)
    for n in range(13, 41):
        parts = torch.randn(n, 8, generator=gen, dtype=torch.float64)
        for s in range(n):
            CyclicRepetitionConfig(scheme="cyclic_repetition", stragglers=s).validate_for(n)
            code = build("cyclic_repetition", n, s)
            B = code.B
            window = torch.zeros(n, n, dtype=torch.bool)  # w..w+s (mod n) in row w
            for k in range(s + 1):
                window[torch.arange(n), (torch.arange(n) + k) % n] = True
            assert torch.equal(B != 0, window), (n, s)
            assert code.load == pytest.approx((s + 1) / n)
            missing_sets = [{(start + k) % n for k in range(s)} for start in (0, n // 4, n // 2, n - 1)]
            missing_sets += [set(torch.randperm(n, generator=gen)[:s].tolist()) for _ in range(2)]
            coded = B @ parts
            for missing in missing_sets:
                alive = [w for w in range(n) if w not in missing]
                assert condition_number(B[alive]) < 1e10, (n, s)
                a = code.decode(alive)
                assert torch.all(a[sorted(missing)] == 0)
                assert float((a @ B - 1).abs().max()) < 1e-6, (n, s)
                full = a @ coded  # what the survivors' messages combine to
                err = float((full - parts.sum(0)).abs().max() / parts.sum(0).abs().max())
                assert err < 1e-5, (n, s, err)


def test_cyclic_support_is_cyclic_and_fractional_is_blocks() -> None:
    code = build("cyclic_repetition", 7, 2)
    assert code.parts(6) == [0, 1, 6]
    fr = build("fractional_repetition", 6, 2)
    assert fr.parts(4) == [3, 4, 5] and fr.load == pytest.approx(3 / 6)


def test_too_few_survivors_is_refused() -> None:
    fr = build("fractional_repetition", 6, 1)
    with pytest.raises(UndecodableError):
        fr.decode([2, 3, 4, 5])  # group {0, 1} lost entirely
    with pytest.raises(UndecodableError):
        decode_gradient(fr, {2: torch.ones(3), 3: torch.ones(3)})


def test_decode_gradient_matches_full_sum_in_float32() -> None:
    gen = torch.Generator().manual_seed(0)
    n, s, dim = 10, 3, 50
    parts = torch.randn(n, dim, generator=gen)
    code = build("cyclic_repetition", n, s)
    coded = code.B.float() @ parts
    arrived = {w: coded[w] for w in (0, 2, 3, 5, 6, 8, 9)}
    torch.testing.assert_close(decode_gradient(code, arrived), parts.sum(0), atol=1e-3, rtol=1e-4)


def test_worst_condition_number_is_moderate_for_small_n() -> None:
    for n in (8, 12):
        for s in (1, 2, 3):
            assert build("cyclic_repetition", n, s).worst_condition() < 1e4


def test_registry_refuses_unknown_and_duplicates() -> None:
    with pytest.raises(ValueError, match="known: cyclic_repetition, fractional_repetition"):
        build("mds", 4, 1)
    with pytest.raises(ValueError, match="already registered"):
        CODES.register(CyclicRepetitionConfig, lambda cfg, n: None)


@pytest.mark.parametrize(
    ("cfg", "n", "message"),
    [
        (FractionalRepetitionConfig(scheme="fractional_repetition", stragglers=2), 8, "divisible by"),
        (CyclicRepetitionConfig(scheme="cyclic_repetition", stragglers=8), 8, "below num_workers"),
        (SequentialGCConfig(scheme="sequential_gc", stragglers=1, burst=2, window=4), 8,
         "window - 1 \\(3\\) divisible by burst"),
        (MultiplexedSGCConfig(scheme="multiplexed_sgc", stragglers=4, window=3), 4, "below num_workers"),
    ],
)
def test_validate_for_refuses_impossible_codes(cfg, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cfg.validate_for(n)


def test_burst_must_be_below_window() -> None:
    with pytest.raises(ValueError, match="burst"):
        MultiplexedSGCConfig(scheme="multiplexed_sgc", burst=3, window=3)


def test_build_from_config_and_delay() -> None:
    cfg = MultiplexedSGCConfig(scheme="multiplexed_sgc", stragglers=2, burst=2, window=3)
    code = CODES.build(cfg, 8)
    assert code.delay == cfg.delay == 3
    assert CODES.build(SequentialGCConfig(scheme="sequential_gc", burst=1, window=3), 8).delay == 1


def test_config_does_not_import_torch() -> None:
    code = "import sys, algorithms.coding.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(13, 48), data=st.data())
def test_random_survivor_sets_decode_for_larger_n(n: int, data) -> None:  # type: ignore[no-untyped-def]
    """Beyond the exhaustive n <= 12: random s and random survivor sets, decoded gradients exact
    to float64 rounding times the conditioning (messages in float64, as the server sends them)."""
    s = data.draw(st.integers(1, min(6, n - 1)))
    missing = data.draw(st.lists(st.integers(0, n - 1), min_size=s, max_size=s, unique=True))
    alive = [w for w in range(n) if w not in missing]
    schemes = ["cyclic_repetition"] + (["fractional_repetition"] if n % (s + 1) == 0 else [])
    gen = torch.Generator().manual_seed(n * 100 + s)
    parts = torch.randn(n, 30, generator=gen, dtype=torch.float64)
    for scheme in schemes:
        code = build(scheme, n, s)
        a = code.decode(alive)
        assert torch.all(a[missing] == 0)
        assert float((a @ code.B - 1).abs().max()) < 1e-7
        coded = code.B @ parts
        full = decode_gradient(code, {w: coded[w] for w in alive})
        torch.testing.assert_close(full, parts.sum(0), atol=1e-8, rtol=1e-8)


def test_unit_weights_tells_which_codes_need_float64() -> None:
    from algorithms.coding.decode import unit_weights

    assert unit_weights(build("fractional_repetition", 6, 1))
    assert not unit_weights(build("cyclic_repetition", 7, 2))
    assert unit_weights(build("multiplexed_sgc", 8, 1, burst=1, window=2))  # FR inside (2 | 8)
    assert not unit_weights(build("sequential_gc", 7, 2, burst=1, window=2))  # s = 1: cyclic, 2 !| 7
