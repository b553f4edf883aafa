"""The verdict rule against statistics computed by hand (and scipy's t quantiles)."""

import math

import pytest
from scipy import stats

from service.reproduce.manifest import Claim
from service.reproduce.verdict import TrialValues, judge, t975


def trial(rule: str, seed: int, acc: float, attack: str = "uniform") -> TrialValues:
    return TrialValues(params={"distributed.aggregator.name": rule, "train.seed": str(seed),
                               "faults.byzantine.attack.name": attack},
                       final={"eval/accuracy": acc}, best={"eval/accuracy": acc + 0.01})


def claim(**over: object) -> Claim:
    doc: dict[str, object] = {"statement": "flag beats mean", "metric": "eval/accuracy",
                              "method": {"distributed.aggregator.name": "flag"},
                              "baselines": [{"distributed.aggregator.name": "mean"}],
                              "within": ["faults.byzantine.attack.name"], "pair_by": ["train.seed"]}
    doc.update(over)
    return Claim.model_validate(doc)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 30])
def test_t_quantiles_are_students(df: int) -> None:
    assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_a_paired_win_holds_with_the_interval_computed_by_hand() -> None:
    flag = [0.94, 0.95, 0.93]
    mean = [0.10, 0.08, 0.12]
    trials = [trial("flag", s, a) for s, a in enumerate(flag)] + [trial("mean", s, a) for s, a in enumerate(mean)]
    res = judge(claim(), trials)
    [cmp] = res.comparisons
    diffs = [f - m for f, m in zip(flag, mean, strict=True)]
    se = stats.tstd(diffs) / math.sqrt(3)
    assert cmp.n == 3 and cmp.mean == pytest.approx(sum(diffs) / 3)
    assert cmp.half_width == pytest.approx(stats.t.ppf(0.975, 2) * se, rel=1e-3)
    assert cmp.outcome == "better" and res.verdict == "holds"


def test_pairs_follow_the_seed_not_the_order() -> None:
    # flag wins on every seed by 0.01, but sorted differently: pairing by position would mix them
    trials = [trial("flag", 2, 0.91), trial("flag", 0, 0.51), trial("flag", 1, 0.71),
              trial("mean", 0, 0.50), trial("mean", 1, 0.70), trial("mean", 2, 0.90)]
    [cmp] = judge(claim(), trials).comparisons
    assert cmp.mean == pytest.approx(0.01) and cmp.half_width == pytest.approx(0.0, abs=1e-9)
    assert cmp.outcome == "better"


def test_a_loss_fails_the_claim_and_noise_is_inconclusive() -> None:
    lose = [trial("flag", s, 0.5) for s in range(3)] + [trial("mean", s, 0.9 + 0.01 * s) for s in range(3)]
    assert judge(claim(), lose).verdict == "does not hold"
    noisy = [trial("flag", s, a) for s, a in enumerate([0.9, 0.5, 0.7])] + \
            [trial("mean", s, a) for s, a in enumerate([0.6, 0.8, 0.7])]
    res = judge(claim(), noisy)
    assert res.comparisons[0].outcome == "tie" and res.verdict == "inconclusive"
    assert judge(claim(expect="no_worse"), noisy).verdict == "holds"


def test_lower_is_better_and_best_values_and_tolerance() -> None:
    trials = [trial("flag", s, 0.30) for s in range(3)] + [trial("mean", s, 0.31 + 0.001 * s) for s in range(3)]
    loss = claim(higher_is_better=False)  # lower accuracy "wins": the sign flips
    assert judge(loss, trials).comparisons[0].mean > 0
    big_tol = judge(claim(tolerance=0.05, higher_is_better=False), trials)
    assert big_tol.comparisons[0].outcome == "tie"  # a real but small difference, under the tolerance
    best = judge(claim(stat="best"), trials)
    assert best.comparisons[0].mean == pytest.approx(-0.011, abs=1e-9)


def test_cells_where_and_missing_groups() -> None:
    trials = [trial("flag", s, 0.9, attack=a) for s in range(2) for a in ("uniform", "alie")] + \
             [trial("mean", s, 0.1, attack="uniform") for s in range(2)]
    res = judge(claim(), trials)
    assert {c.cell["faults.byzantine.attack.name"]: c.outcome for c in res.comparisons} == \
        {"alie": "missing", "uniform": "better"}
    assert res.verdict == "inconclusive"
    only_uniform = judge(claim(where={"faults.byzantine.attack.name": ["uniform"]}), trials)
    assert [c.cell for c in only_uniform.comparisons] == [{"faults.byzantine.attack.name": "uniform"}]


def test_one_pair_is_never_evidence() -> None:
    trials = [trial("flag", 0, 0.9), trial("mean", 0, 0.1)]
    res = judge(claim(expect="no_worse"), trials)
    assert res.comparisons[0].n == 1 and res.verdict == "inconclusive"


def test_numbers_written_differently_select_the_same_trials() -> None:
    def merged(method: str, width: str | None, acc: float) -> TrialValues:
        params = {"merge.method": method, "merge.inputs": '["a", "b"]'}
        if width is not None:
            params["merge.target_width"] = width
        return TrialValues(params=params, final={"eval/accuracy": acc}, best={})

    c = Claim.model_validate({"statement": "s", "metric": "eval/accuracy", "pair_by": ["merge.inputs"],
                              "method": {"merge.method": "pleas", "merge.target_width": 1},
                              "baselines": [{"merge.method": "average"}]})
    res = judge(c, [merged("pleas", "1.0", 0.8), merged("pleas", "0.75", 0.1), merged("average", None, 0.5)])
    assert res.comparisons[0].n == 1 and res.comparisons[0].mean == pytest.approx(0.3)


def test_a_gap_is_the_difference_of_two_metrics() -> None:
    def run(opt: str, seed: int, ev: float, tr: float) -> TrialValues:
        return TrialValues(params={"optimizer.name": opt, "train.seed": str(seed)},
                           final={"eval/loss": ev, "train/loss": tr}, best={})

    trials = [run("adazo_sam", s, 0.30, 0.20 + 0.001 * s) for s in range(3)] + \
             [run("adamw", s, 0.40, 0.10) for s in range(3)]
    c = Claim.model_validate({"statement": "smaller gap", "metric": "eval/loss - train/loss",
                              "higher_is_better": False, "method": {"optimizer.name": "adazo_sam"},
                              "baselines": [{"optimizer.name": "adamw"}], "pair_by": ["train.seed"]})
    [cmp] = judge(c, trials).comparisons
    assert cmp.mean == pytest.approx(0.3 - (0.1 - 0.001), abs=1e-9) and cmp.outcome == "better"
