import argparse
import csv
import itertools
import json
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import merged_resnet as mr

TINY = [
    "--dataset",
    "shapes",
    "--train-size",
    "400",
    "--test-size",
    "100",
    "--image-size",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--eval-batch-size",
    "250",
]


def random_probs(n, k, generator):
    x = torch.rand(n, k, generator=generator, dtype=torch.float64) ** 4  # peaked, like soft-max outputs
    return (x / x.sum(1, keepdim=True)).float()


def algorithm1_loops(p_coarse, p_fine, fine_coarse, alpha):
    """Algorithm 1 exactly as printed in the paper, one sample at a time, in plain Python loops."""
    adjusted_coarse = np.zeros_like(p_coarse, dtype=np.float64)
    adjusted_fine = np.zeros_like(p_fine, dtype=np.float64)
    for n in range(len(p_coarse)):
        q = [
            sum(float(p_fine[n, j]) for j in range(len(fine_coarse)) if fine_coarse[j] == i)
            for i in range(p_coarse.shape[1])
        ]
        for i in range(p_coarse.shape[1]):
            target = (float(p_coarse[n, i]) + q[i]) / 2
            adjusted_coarse[n, i] = (1 - alpha) * float(p_coarse[n, i]) + alpha * target
            children = [j for j in range(len(fine_coarse)) if fine_coarse[j] == i]
            for j in children:
                if q[i] != 0:
                    fine_target = float(p_fine[n, j]) * target / q[i]
                    adjusted_fine[n, j] = (1 - alpha) * float(p_fine[n, j]) + alpha * fine_target
                else:
                    adjusted_fine[n, j] = adjusted_coarse[n, i] / len(children)
    return adjusted_coarse, adjusted_fine


@pytest.fixture
def planted():
    """Probabilities over 4 coarse classes with 1, 2, 3 and 4 fine children (10 fine classes)."""
    g = torch.Generator().manual_seed(0)
    fine_coarse = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    return random_probs(64, 4, g), random_probs(64, 10, g), fine_coarse


def test_adaptation_alpha0_returns_inputs(planted):
    p_coarse, p_fine, fine_coarse = planted
    adj_coarse, adj_fine = mr.classifier_adaptation(p_coarse, p_fine, fine_coarse, 0.0)
    torch.testing.assert_close(adj_coarse, p_coarse, atol=1e-7, rtol=0)
    torch.testing.assert_close(adj_fine, p_fine, atol=1e-7, rtol=0)


def test_adaptation_alpha2_coarse_is_sum_of_fine_children(planted):
    p_coarse, p_fine, fine_coarse = planted
    adj_coarse, _ = mr.classifier_adaptation(p_coarse, p_fine, fine_coarse, 2.0)
    for i in range(4):
        children_sum = p_fine[:, fine_coarse == i].sum(1)
        torch.testing.assert_close(adj_coarse[:, i], children_sum, atol=1e-6, rtol=0)
    # The original coarse prediction is gone entirely: a different coarse input gives the same output.
    other_coarse = random_probs(64, 4, torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        mr.classifier_adaptation(other_coarse, p_fine, fine_coarse, 2.0)[0], adj_coarse, atol=1e-6, rtol=0
    )


def test_adaptation_alpha1_satisfies_equation1(planted):
    p_coarse, p_fine, fine_coarse = planted
    adj_coarse, adj_fine = mr.classifier_adaptation(p_coarse, p_fine, fine_coarse, 1.0)

    def gap(pc, pf):  # mean of sum_i |P(c_i) - sum_{s(j)=i} P(f_j)|
        return sum((pf[:, fine_coarse == i].sum(1) - pc[:, i]).abs() for i in range(4)).mean().item()

    assert gap(p_coarse, p_fine) > 0.1
    assert gap(adj_coarse, adj_fine) < 1e-5


def test_adaptation_outputs_are_probability_vectors_and_match_the_printed_algorithm(planted):
    p_coarse, p_fine, fine_coarse = planted
    p_fine = p_fine.clone()
    p_fine[0, fine_coarse == 2] = 0  # coarse class 2 has no fine mass: Algorithm 1's else branch
    p_fine[0] /= p_fine[0].sum()
    for alpha in mr.ALPHAS:
        adj_coarse, adj_fine = mr.classifier_adaptation(p_coarse, p_fine, fine_coarse, float(alpha))
        ref_coarse, ref_fine = algorithm1_loops(p_coarse[:8].numpy(), p_fine[:8].numpy(), fine_coarse, float(alpha))
        np.testing.assert_allclose(adj_coarse[:8].numpy(), ref_coarse, atol=1e-6)
        np.testing.assert_allclose(adj_fine[:8].numpy(), ref_fine, atol=1e-6)
        assert (adj_coarse >= -1e-7).all() and (adj_fine[1:] >= -1e-7).all()
        torch.testing.assert_close(adj_coarse.sum(1), torch.ones(64), atol=1e-5, rtol=0)
        torch.testing.assert_close(adj_fine[1:].sum(1), torch.ones(63), atol=1e-5, rtol=0)


def test_alpha_errors_recovers_planted_improvement():
    """Coarse scores that are noisy but whose fine children carry the right answer: alpha = 2 fixes them."""
    fine_coarse = np.repeat(np.arange(3), 2)
    y_fine = torch.arange(60) % 6
    y_coarse = torch.as_tensor(fine_coarse)[y_fine]
    p_fine = torch.full((60, 6), 0.02).scatter_(1, y_fine[:, None], 0.9)
    p_coarse = torch.full((60, 3), 0.3).scatter_(1, ((y_coarse + 1) % 3)[:, None], 0.4)  # always wrong
    errors = mr.alpha_errors(p_coarse, p_fine, y_coarse, y_fine, fine_coarse)
    assert errors.shape == (len(mr.ALPHAS), 2)
    assert errors[0, 0] == 100.0 and errors[-1, 0] == 0.0 and (errors[:, 1] == 0.0).all()


@pytest.mark.parametrize("backbone,depth", [("resnet", 11), ("densenet", 10)])
def test_merge_k_shares_exactly_the_first_k_stages(backbone, depth):
    args = mr.get_args(["--backbone", backbone, "--depth", str(depth)])
    x = torch.randn(2, 3, 8, 8)
    for k in range(4):
        coarse_net, fine_net = mr.build_pair(args, 5, 12, seed=1)
        model = mr.MergedNet(coarse_net, fine_net, k).eval()

        def ids(module):
            return {id(p) for p in module.parameters()}

        assert (ids(coarse_net.stem) == ids(fine_net.stem)) == (k >= 1)
        if k == 0:
            assert not ids(coarse_net) & ids(fine_net)  # merge-0 shares no parameter at all
        for i in range(3):
            shared = [a is b for a, b in zip(coarse_net.stages[i].parameters(), fine_net.stages[i].parameters())]
            assert all(shared) if i < k else not any(shared), (k, i)
        assert (ids(coarse_net.head.pre) == ids(fine_net.head.pre)) == (k == 3)
        assert not ids(coarse_net.head.fc) & ids(fine_net.head.fc)
        assert coarse_net.head.fc.out_features == 5 and fine_net.head.fc.out_features == 12
        shared_numel = sum(p.numel() for p in coarse_net.parameters() if id(p) in ids(fine_net))
        assert (
            common.count_params(model) == common.count_params(coarse_net) + common.count_params(fine_net) - shared_numel
        )
        # Computing the shared trunk once gives what the two networks give one by one.
        with torch.no_grad():
            out_coarse, out_fine = model(x)
            torch.testing.assert_close(out_coarse, coarse_net(x))
            torch.testing.assert_close(out_fine, fine_net(x))


def test_regularized_incomplete_beta_closed_forms():
    for x in (0.01, 0.3, 0.5, 0.77, 0.99):
        assert math.isclose(mr.regularized_incomplete_beta(1, 1, x), x, rel_tol=1e-12)
        assert math.isclose(mr.regularized_incomplete_beta(3.5, 1, x), x**3.5, rel_tol=1e-10)
        assert math.isclose(mr.regularized_incomplete_beta(1, 2.5, x), 1 - (1 - x) ** 2.5, rel_tol=1e-10)
        # Symmetry I_x(a, b) = 1 - I_{1-x}(b, a)
        assert math.isclose(
            mr.regularized_incomplete_beta(2.3, 7.1, x),
            1 - mr.regularized_incomplete_beta(7.1, 2.3, 1 - x),
            abs_tol=1e-12,
        )


def test_t_distribution_matches_table_values():
    # Textbook critical values (two-sided 0.05 / one-sided 0.05).
    assert abs(mr.student_t_pvalue(2.228, 10) - 0.05) < 2e-4
    assert abs(mr.student_t_pvalue(1.812, 10, two_sided=False) - 0.05) < 2e-4
    assert abs(mr.student_t_pvalue(2.776, 4) - 0.05) < 2e-4
    assert abs(mr.student_t_pvalue(12.706, 1) - 0.05) < 2e-4
    assert abs(mr.student_t_pvalue(2.576, 10**6) - 0.01) < 2e-4  # the normal limit
    # df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t) / pi.
    for t in (-3.0, -0.4, 0.0, 1.0, 7.5):
        assert math.isclose(mr.student_t_cdf(t, 1), 0.5 + math.atan(t) / math.pi, abs_tol=1e-12)
    # Against the density integrated numerically.
    for t, df in ((0.7, 3), (2.1, 7), (-1.3, 15)):
        grid = np.linspace(-200.0, t, 400001)
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(grid**2 / df))
        integral = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(grid)))
        tail = 2 * (1 - mr.student_t_cdf(200.0, df)) / 2  # mass left of -200, by symmetry
        assert abs(mr.student_t_cdf(t, df) - (integral + tail)) < 1e-6


def test_paired_t_test_by_hand():
    a = np.array([20.1, 19.8, 21.0, 20.5, 19.9])
    b = np.array([20.9, 20.3, 21.2, 21.4, 20.1])
    result = mr.paired_t_test(a, b)
    d = a - b
    t = d.mean() / math.sqrt(sum((v - d.mean()) ** 2 for v in d) / 4 / 5)
    assert math.isclose(result["t"], t, rel_tol=1e-12) and result["df"] == 4
    assert math.isclose(result["p"], mr.student_t_pvalue(t, 4), rel_tol=1e-12)
    assert 0.01 < result["p"] < 0.05  # t = -3.54 with 4 degrees of freedom
    assert not result["no_spread"]
    assert math.isnan(mr.paired_t_test(a[:1], b[:1])["p"])


def test_paired_t_test_reports_no_spread_instead_of_a_p_value():
    # Every run ten test images better: the differences agree up to float rounding only.
    n = 5000
    a, b = 100 * np.array([53, 60, 71]) / n, 100 * np.array([43, 50, 61]) / n
    assert np.ptp(a - b) > 0  # the rounding the test is about
    for first, second in ((a, b), (b, a), (a, a)):  # the same difference, either sign, or none at all
        result = mr.paired_t_test(first, second)
        assert result["no_spread"] and math.isnan(result["t"]) and math.isnan(result["p"])
    assert math.isclose(mr.paired_t_test(a, b)["mean_diff"], 0.2)
    spread = mr.paired_t_test(a, b + np.array([0, 0.02, -0.02]))  # a real spread is tested
    assert not spread["no_spread"] and 0 < spread["p"] < 1
    text = mr.summary_text(
        {
            "m/ensemble-1/fine": {
                "architecture": "m",
                "ensemble": 1,
                "level": "fine",
                "alpha": 1.0,
                "source": "validation",
            }
            | {f"test_err{k}_{s}": 1.0 for k in ("", "_alpha0", "_alpha1") for s in ("mean", "std")}
        },
        [{"level": "fine", "a": "x", "b": "y", "alpha_a": 1.0, "alpha_b": 1.0, **mr.paired_t_test(a, b)}],
        {},
        {},
        3,
    )
    assert "no spread" in text and "p 0.0000" not in text


def test_ensembles_from_runs_equal_a_direct_average():
    """Three runs, each wrong on a different third of the images; any two of them averaged are right."""
    fine_coarse = np.repeat(np.arange(2), 3)  # 2 coarse classes of 3 fine ones
    n = 30
    y_fine = torch.arange(n) % 6
    y_coarse = torch.as_tensor(fine_coarse)[y_fine]
    runs = []
    for r in range(3):
        wrong = torch.arange(n) % 3 == r  # run r errs here with a small margin
        p_fine = torch.full((n, 6), 0.05).scatter_(1, y_fine[:, None], 0.75)
        p_fine[wrong] = 0.05
        p_fine[wrong, y_fine[wrong]] = 0.3
        p_fine[wrong, (y_fine[wrong] + 3) % 6] = 0.5  # the other coarse class's child wins
        p_coarse = torch.full((n, 2), 0.1).scatter_(1, y_coarse[:, None], 0.9)
        p_coarse[wrong] = torch.tensor([0.5, 0.5]) + 0.1 * (1 - 2 * F.one_hot(y_coarse[wrong], 2).float())
        runs.append((p_coarse, p_fine))
    labels = (y_coarse, y_fine)
    members, errors = mr.ensemble_errors(runs, labels, fine_coarse, 2)
    assert members == [(0, 1), (0, 2), (1, 2)] and errors.shape == (3, len(mr.ALPHAS), 2)
    for row, (i, j) in zip(errors, members):
        direct = mr.alpha_errors(
            (runs[i][0] + runs[j][0]) / 2, (runs[i][1] + runs[j][1]) / 2, y_coarse, y_fine, fine_coarse
        )
        np.testing.assert_array_equal(row, direct)
    singles = mr.ensemble_errors(runs, labels, fine_coarse, 1)[1]
    assert (singles[:, 0, :] == 100 / 3).all()  # every single model: a third wrong at both levels
    assert (errors[:, 0, :] == 0).all()  # every pair: right everywhere
    assert mr.ensemble_errors(runs, labels, fine_coarse, 3)[0] == [(0, 1, 2)]


def test_model_seeds_are_distinct_and_tasks_cover_every_model_once():
    seeds = {mr.model_seed(0, a, r) for a in mr.ARCHITECTURES for r in range(20)}
    assert len(seeds) == len(mr.ARCHITECTURES) * 20
    assert mr.model_seed(0, "separate", 0) != mr.model_seed(0, "merge-0", 0)
    for k in (1, 2, 3, 4):
        shares = mr.assign_tasks(list(mr.ARCHITECTURES), 2, k)
        flat = [m for share in shares for m in share]
        assert sorted(flat) == sorted((a, r) for a in mr.ARCHITECTURES for r in range(2))
        loads = [sum(mr.RELATIVE_COST[a] for a, _ in share) for share in shares]
        assert max(loads) - min(loads) <= max(mr.RELATIVE_COST.values())  # greedy balance
    # Each run is spread over the processes on its own (a grown --runs trains its new run side by
    # side): four processes take the five models of run 2 as {separate}, {merge-0}, {merge-1},
    # {merge-2, merge-3}, the best split (loads 2, 2, 5/3, 7/3); and a process goes run by run.
    shares = mr.assign_tasks(list(mr.ARCHITECTURES), 3, 4)
    run2 = [sorted(a for a, r in share if r == 2) for share in shares]
    assert sorted(run2) == [["merge-0"], ["merge-1"], ["merge-2", "merge-3"], ["separate"]]
    assert all([r for _, r in share] == sorted(r for _, r in share) for share in shares)
    assert mr.assign_tasks(["separate", "merge-3"], 3, 2)[0] == [("separate", 0), ("merge-3", 1), ("separate", 2)]


def test_what_the_runs_support_is_said_plainly():
    assert abs(mr.t_critical(1) - 12.706) < 1e-3 and abs(mr.t_critical(4) - 2.776) < 1e-3
    two = " ".join(mr.runs_support(2, [1, 2, 4]))
    assert "t-tests: none" in two and "1 degree of freedom" in two and "12.71" in two
    assert "one ensemble of all 2 runs, no band" in two and "ensemble-4: needs 4 runs" in two
    five = " ".join(mr.runs_support(5, [1, 2, 4]))
    assert "4 degrees of freedom" in five and "|t| > 2.78" in five and "+-35%" in five
    assert "ensemble-2: 10 combinations" in five and "ensemble-4: 5 combinations" in five
    assert "Bands: none" in " ".join(mr.runs_support(1, [1]))


def test_lr_schedule_warmup_then_drops_at_half_and_three_quarters():
    lr, epochs, steps_per_epoch = 0.1, 4, 100
    total = epochs * steps_per_epoch  # drops after 200 and 300 steps; the warm-up is at most 1% = 4 steps

    def documented(step, warmup):
        if step < warmup:
            return lr / 10
        if step < 0.5 * total:
            return lr
        return lr / 10 if step < 0.75 * total else lr / 100

    for warmup_iters in (400, 3, 0):  # capped at 1%, under the cap, none
        warmup = min(warmup_iters, total // 100)
        lr_at = mr.make_lr_schedule(
            argparse.Namespace(epochs=epochs, lr=lr, warmup_iters=warmup_iters), steps_per_epoch
        )
        assert [lr_at(s) for s in range(total + 5)] == [documented(s, warmup) for s in range(total + 5)], warmup_iters
    lr_at = mr.make_lr_schedule(argparse.Namespace(epochs=epochs, lr=lr, warmup_iters=400), steps_per_epoch)
    assert [lr_at(s) for s in (3, 4, 199, 200, 299, 300)] == [lr / 10, lr, lr, lr / 10, lr / 10, lr / 100]


def test_t_tests_compare_the_planted_columns():
    """Random curves, merge-1 5 points better at the t-test alpha (0.7) at the fine level only."""
    rng = np.random.default_rng(0)
    archs, levels, runs, a_test = ("separate", "merge-1", "merge-3"), ("coarse", "fine"), 5, 7
    curves = {(a, 1): {"test": 30 + rng.normal(0, 1, (runs, len(mr.ALPHAS), 2))} for a in archs}
    curves["merge-1", 1]["test"][:, a_test, 1] -= 5
    curves["merge-3", 2] = {"test": rng.normal(0, 1, (10, len(mr.ALPHAS), 2))}  # ensembles are not t-tested
    ref = {("separate", "coarse"): 0, ("merge-1", "coarse"): 20, ("merge-3", "coarse"): 9}  # the curve's ends
    ref |= {("separate", "fine"): 1, ("merge-1", "fine"): 12, ("merge-3", "fine"): 19}
    reference = {f"{a}/ensemble-1/{level}": {"alpha_index": i} for (a, level), i in ref.items()}
    results = mr.t_tests(curves, reference, levels, 0.7)
    got = {(r["kind"], r["level"], r["a"], r["b"], r["alpha_a"], r["alpha_b"]): r for r in results}
    assert len(got) == len(results)
    alpha = [float(v) for v in mr.ALPHAS]
    expected = {}  # key -> (the first's errors, the second's errors), the columns picked by hand
    for li, level in enumerate(levels):
        for x, y in itertools.combinations(archs, 2):
            columns = curves[x, 1]["test"][:, a_test, li], curves[y, 1]["test"][:, a_test, li]
            expected["architectures", level, x, y, 0.7, 0.7] = columns
        for arch in archs:
            i = ref[arch, level]
            for j in range(max(i - 2, 0), min(i + 2, len(alpha) - 1) + 1):
                if j != i:
                    columns = curves[arch, 1]["test"][:, i, li], curves[arch, 1]["test"][:, j, li]
                    expected["alpha", level, arch, arch, alpha[i], alpha[j]] = columns
    assert set(got) == set(expected)
    for key, (first, second) in expected.items():
        d = first - second
        t = d.mean() / (d.std(ddof=1) / math.sqrt(runs))
        assert got[key]["df"] == runs - 1 and math.isclose(got[key]["mean_diff"], d.mean(), rel_tol=1e-12), key
        assert math.isclose(got[key]["t"], t, rel_tol=1e-9), key
        assert math.isclose(got[key]["p"], mr.student_t_pvalue(t, runs - 1), rel_tol=1e-9), key
    assert got["architectures", "fine", "separate", "merge-1", 0.7, 0.7]["p"] < 0.01
    assert got["architectures", "coarse", "separate", "merge-1", 0.7, 0.7]["p"] > 0.05


def test_reference_alphas_chosen_on_validation_ties_to_the_smaller_alpha():
    rng = np.random.default_rng(1)
    val = 20 + rng.uniform(0, 1, (3, len(mr.ALPHAS), 2))
    val[:, 13, 0] -= 5  # coarse: the least mean validation error at alpha 1.3 ...
    val[0, 2, 0] -= 6  # ... though run 0 alone has its minimum at 0.2
    val[:, 4, 1] -= 5
    val[:, 16, 1] = val[:, 4, 1]  # fine: equal means at 0.4 and 1.6
    test = 20 + rng.uniform(0, 1, (3, len(mr.ALPHAS), 2))
    test[:, 8, :] -= 10  # the test minimum (0.8) is not the validation choice
    curves = {("merge-2", 1): {"val": val, "test": test}, ("merge-2", 3): {"val": val[:1], "test": test[:1]}}
    reference = mr.reference_alphas(curves, ("coarse", "fine"), "val")
    assert set(reference) == {f"merge-2/ensemble-{n}/{level}" for n in (1, 3) for level in ("coarse", "fine")}
    for level_index, level, chosen in ((0, "coarse", 13), (1, "fine", 4)):
        entry = reference[f"merge-2/ensemble-1/{level}"]
        assert entry["alpha"] == float(mr.ALPHAS[chosen]) and entry["alpha_index"] == chosen
        assert entry["source"] == "validation" and math.isclose(entry["val_err"], val[:, chosen, level_index].mean())
        for suffix, column in (("", chosen), ("_alpha0", 0), ("_alpha1", 10)):
            errors = list(test[:, column, level_index])
            assert math.isclose(entry[f"test_err{suffix}_mean"], statistics.mean(errors)), suffix
            assert math.isclose(entry[f"test_err{suffix}_std"], statistics.stdev(errors)), suffix
    assert reference["merge-2/ensemble-3/coarse"]["alpha"] == 0.2  # one combination: run 0's own minimum
    assert reference["merge-2/ensemble-3/coarse"]["test_err_std"] == 0.0
    # Without validation: the test curve's minimum, described as such.
    on_test = mr.reference_alphas(curves, ("coarse", "fine"), "test")["merge-2/ensemble-1/fine"]
    assert on_test["alpha"] == 0.8 and "val_err" not in on_test and "descriptive" in on_test["source"]
    assert math.isclose(on_test["test_err_mean"], test[:, 8, 1].mean())


def test_mean_of_records_leaves_out_none():
    records = [
        {"top1": 50.0, "severity": None, "acc": {"coarse": 80.0, "fine": None}, "never": None},
        {"top1": 70.0, "severity": 2.0, "acc": {"coarse": 60.0, "fine": 30.0}, "never": None},
        {"top1": 90.0, "severity": 1.0, "acc": {"coarse": 70.0, "fine": None}, "never": None},
    ]
    expected = {"top1": 70.0, "severity": 1.5, "acc": {"coarse": 70.0, "fine": 30.0}, "never": None}
    assert mr.mean_of_records(records) == expected


def test_hierarchy_metrics_equal_direct_metrics_of_the_adapted_scores_averaged_over_runs():
    """Every image is fine class 2 (coarse 1); four kinds of prediction, mixed differently in each run."""
    fine_coarse = np.array([0, 0, 1, 1, 1])
    kinds = {  # (coarse probabilities, fine probabilities)
        "right": ([0.2, 0.8], [0.05, 0.05, 0.7, 0.1, 0.1]),
        # fine top-1 is class 0, the coarse head says 1; adapted at alpha 1, both agree on class 2
        "flip": ([0.1, 0.9], [0.38, 0.02, 0.3, 0.28, 0.02]),
        # the coarse head says 0 against fine mass 0.9 under coarse 1: adapted at alpha 1, it says 1
        "coarse flip": ([0.55, 0.45], [0.05, 0.05, 0.7, 0.1, 0.1]),
        "near": ([0.2, 0.8], [0.05, 0.05, 0.2, 0.6, 0.1]),  # wrong sibling (LCA height 1) at every alpha
        "far": ([0.9, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]),  # wrong coarse class (height 2) at every alpha
    }
    runs = {
        "merge-2": [
            ["right", "right", "coarse flip", "flip"],
            ["flip", "flip", "near", "right"],
            ["far", "near", "flip", "right"],
        ],
        "merge-3": [["right"] * 4, ["near", "right", "right", "right"], ["right"] * 4],
    }
    probs = {
        (arch, r): tuple(torch.tensor([kinds[k][level] for k in run]) for level in (0, 1))
        for arch, arch_runs in runs.items()
        for r, run in enumerate(arch_runs)
    }
    models = {key: {"logits": {"test": {"coarse": pc.log(), "fine": pf.log()}}} for key, (pc, pf) in probs.items()}
    labels = {
        "fine_to_coarse": torch.as_tensor(fine_coarse),
        "level_names": ["coarse", "fine"],
        "class_names": [["c0", "c1"], [f"f{j}" for j in range(5)]],
        "splits": {"test": {"coarse": torch.ones(4, dtype=torch.long), "fine": torch.full((4,), 2)}},
    }
    hierarchy = common.Hierarchy(["coarse", "fine"], labels["class_names"], [fine_coarse, np.arange(5)])

    def average(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    result = mr.hierarchy_metrics(models, labels, list(runs), 3, 1.0)
    for arch in runs:
        assert result[arch]["alpha"] == 1.0
        for point, alpha in (("at_alpha0", 0.0), ("at_alpha", 1.0)):
            per_run = []
            for r in range(3):
                adj_coarse, adj_fine = algorithm1_loops(*(p.numpy() for p in probs[arch, r]), fine_coarse, alpha)
                preds = {"coarse": adj_coarse.argmax(1)}
                per_run.append(
                    common.hierarchical_metrics(adj_fine, labels["splits"]["test"]["fine"], hierarchy, preds)
                )
            got = result[arch][point]
            assert set(got) == set(per_run[0])
            for key, value in per_run[0].items():
                if isinstance(value, dict):
                    for level in value:
                        assert got[key][level] == pytest.approx(average([m[key][level] for m in per_run])), key
                else:
                    assert got[key] == pytest.approx(average([m[key] for m in per_run])), (arch, point, key)
    # The planted effect, counted by hand: "flip" turns right, it and "coarse flip" consistent at alpha 1.
    at0, at1 = result["merge-2"]["at_alpha0"], result["merge-2"]["at_alpha"]
    assert at0["top1"] == pytest.approx(100 * (3 / 4 + 1 / 4 + 1 / 4) / 3)
    assert at1["top1"] == pytest.approx(100 * (4 / 4 + 3 / 4 + 2 / 4) / 3)
    assert at0["consistency"] == pytest.approx(100 * (2 / 4 + 2 / 4 + 3 / 4) / 3) and at1["consistency"] == 100
    assert at1["mistake_severity"] == pytest.approx((1 + 1.5) / 2)  # run 0 has no mistake: left out, not 0


HIER_KEYS = {"top1", "top5", "level_acc", "mistake_severity", "hdist@1", "hdist@5", "hprecision", "hrecall", "hf1"}


def test_smoke_all_architectures_writes_the_tables(tmp_path):
    out = tmp_path / "run"
    argv = TINY + ["--depth", "11", "--runs", "2", "--val-fraction", "0.1", "--dry-run", "--out-dir", str(out)]
    mr.main(argv)  # 2 batches per training
    for name in ("args.json", "metrics.jsonl", "metrics.json", "alpha_curve.csv", "alpha_curve.txt", "summary.txt"):
        assert (out / name).is_file(), name
    with open(out / "alpha_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(mr.ARCHITECTURES) * len(mr.ALPHAS) * 2  # ensemble-1 and ensemble-2 (4 > 2 runs)
    assert {r["architecture"] for r in rows} == set(mr.ARCHITECTURES)
    for r in rows:
        for key in ("val_coarse_err_mean", "test_fine_err_mean", "test_coarse_err_std"):
            assert 0.0 <= float(r[key]) <= 100.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_coarse"], metrics["n_fine"], metrics["coarse_level"]) == (12, 72, "shape_fill")
    assert metrics["ensembles"] == [1, 2]
    costs = metrics["costs"]
    assert costs["merge-0"]["parameters"] == costs["separate"]["parameters"]
    assert (
        costs["separate"]["parameters"]
        > costs["merge-1"]["parameters"]
        > costs["merge-2"]["parameters"]
        > costs["merge-3"]["parameters"]
    )
    assert all(c["train_seconds"] > 0 for c in costs.values())
    for arch in mr.ARCHITECTURES:
        for level in ("coarse", "fine"):
            best = metrics["best_alpha"][f"{arch}/ensemble-1/{level}"]
            curve = np.array(metrics["curves"][f"{arch}/ensemble-1"]["val"][level])
            assert curve.shape == (2, len(mr.ALPHAS))
            assert math.isclose(best["val_err"], curve.mean(0).min())
            assert best["alpha"] == mr.ALPHAS[int(np.argmin(curve.mean(0)))]
        hier = metrics["hierarchical_metrics"][arch]
        for point in ("at_alpha0", "at_alpha"):
            assert HIER_KEYS | {"consistency"} <= set(hier[point]), point
            assert 0 <= hier[point]["consistency"] <= 100
        assert hier["alpha"] == metrics["best_alpha"][f"{arch}/ensemble-1/fine"]["alpha"]
    # Two runs: one degree of freedom, no test; the summary says so, and what the runs support.
    assert metrics["t_tests"] == [] and metrics["runs_support"] == mr.runs_support(2, [1, 2, 4])
    summary = (out / "summary.txt").read_text()
    assert "no test: 2 runs" in summary and "What 2 runs support" in summary and "ensemble-4: needs 4 runs" in summary
    # separate and merge-0 are distinct trainings: their own seeds, so different predictions.
    assert set(costs["separate"]["seeds"]).isdisjoint(costs["merge-0"]["seeds"])
    separate = torch.load(out / "predictions" / "separate-r0.pt", weights_only=True)
    merge0 = torch.load(out / "predictions" / "merge-0-r0.pt", weights_only=True)
    for level in ("coarse", "fine"):
        assert separate["logits"]["test"][level].shape == merge0["logits"]["test"][level].shape
        assert not torch.allclose(separate["logits"]["test"][level], merge0["logits"]["test"][level], atol=1e-3)
    assert "Paired t-tests" in summary
    # Every table again from the saved logits alone: the same numbers.
    before = {name: (out / name).read_text() for name in ("alpha_curve.csv", "summary.txt", "metrics.json")}
    mr.main(["--resume", str(out), "--analyze-only"])
    assert {name: (out / name).read_text() for name in before} == before


def test_smoke_densenet_full_training_set_shares_and_resume(tmp_path):
    out = tmp_path / "run"
    argv = TINY + ["--backbone", "densenet", "--depth", "10", "--architectures", "merge-2", "--runs", "2"]
    argv += ["--coarse-level", "shape", "--out-dir", str(out)]
    assert mr.main(argv + ["--tasks", "0/2"]) is None  # trains r0 only, no tables yet
    with pytest.raises(SystemExit, match="merge-2-r1"):
        mr.main(["--resume", str(out), "--analyze-only"])
    mr.main(["--resume", str(out), "--tasks", "1/2"])
    metrics = mr.main(["--resume", str(out), "--analyze-only"])
    assert metrics["n_coarse"] == 2 and set(metrics["curves"]) == {"merge-2/ensemble-1", "merge-2/ensemble-2"}
    assert metrics["curves"]["merge-2/ensemble-2"]["members"] == [[0, 1]]
    assert "best_alpha" not in metrics and "val" not in metrics["curves"]["merge-2/ensemble-1"]
    minimum = metrics["test_curve_minimum"]["merge-2/ensemble-1/fine"]
    curve = np.array(metrics["curves"]["merge-2/ensemble-1"]["test"]["fine"])
    assert math.isclose(minimum["test_err_mean"], curve.mean(0).min()) and "val_err" not in minimum
    assert metrics["hierarchical_metrics"]["merge-2"]["alpha"] == 1.0  # fixed in advance without validation
    assert "test curve's minimum" in (out / "summary.txt").read_text()
    before = (out / "alpha_curve.csv").read_text()
    mr.main(["--resume", str(out), "--tasks", "0/1"])  # every model trained: nothing retrains, same numbers
    assert (out / "alpha_curve.csv").read_text() == before
    assert len(common.read_jsonl(out / "metrics.jsonl")) == 2


def test_runs_grow_on_resume_and_only_the_new_runs_models_train(tmp_path):
    """A --runs 2 directory resumed with --runs 3 trains run 2's models alone, the same models a
    --runs 3 start trains (their seeds are per architecture and run), and every table covers 3 runs."""
    argv = TINY + ["--depth", "11", "--architectures", "separate", "merge-3"]
    argv += ["--train-size", "128", "--image-size", "8", "--dtype", "fp32"]  # 4 steps a model; bf16 is slow on CPUs
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    mr.main(argv + ["--runs", "2", "--out-dir", str(grown)])
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (grown / "predictions").glob("*-r*.pt")}
    assert sorted(before) == ["merge-3-r0.pt", "merge-3-r1.pt", "separate-r0.pt", "separate-r1.pt"]
    logged = len(common.read_jsonl(grown / "metrics.jsonl"))
    with pytest.raises(SystemExit, match="--runs 1"):
        mr.main(["--resume", str(grown), "--runs", "1"])  # fewer runs: refused, one line

    metrics = mr.main(["--resume", str(grown), "--runs", "3"])
    trained = {line["stage"] for line in common.read_jsonl(grown / "metrics.jsonl")[logged:]}
    assert trained == {"separate-coarse-r2", "separate-fine-r2", "merge-3-r2"}  # one epoch each, run 2 only
    assert {
        p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (grown / "predictions").glob("*-r[01].pt")
    } == before
    assert metrics["runs"] == 3 and metrics["ensembles"] == [1, 2]
    assert metrics["curves"]["merge-3/ensemble-2"]["members"] == [[0, 1], [0, 2], [1, 2]]
    assert np.array(metrics["curves"]["separate/ensemble-1"]["test"]["fine"]).shape == (3, len(mr.ALPHAS))
    assert metrics["t_tests"] and all(t["df"] == 2 for t in metrics["t_tests"])
    assert "What 3 runs support" in (grown / "summary.txt").read_text()
    assert common.read_run_args(grown)["overrides"][-1]["changes"]["runs"] == {"from": 2, "to": 3}
    mr.main(["--resume", str(grown)])  # the grown length is the run's now: nothing left to train
    assert len(common.read_jsonl(grown / "metrics.jsonl")) == logged + 3

    mr.main(argv + ["--runs", "3", "--out-dir", str(fresh)])
    for architecture in ("separate", "merge-3"):
        a, b = (mr.load_pt(mr.prediction_path(d, architecture, 2)) for d in (grown, fresh))
        assert a["seed"] == b["seed"] == mr.model_seed(0, architecture, 2)
        for level in ("coarse", "fine"):
            assert torch.equal(a["logits"]["test"][level], b["logits"]["test"][level])


def test_val_fraction_zero_trains_on_every_training_image(tmp_path, monkeypatch):
    yielded = []

    class CountingLoader(common.GpuLoader):
        def __iter__(self):
            for x, y in super().__iter__():
                if self.train:
                    yielded.append(y[1].clone())  # the fine labels of a training batch
                yield x, y

    monkeypatch.setattr(common, "GpuLoader", CountingLoader)
    monkeypatch.setattr(mr, "analyze", lambda args, run_dir: None)  # the tables are tested elsewhere
    argv = TINY + ["--depth", "11", "--architectures", "merge-3", "--runs", "1", "--train-size", "192"]
    train_labels = common.load_data(mr.get_args(argv)).train.labels
    expected = torch.bincount(train_labels, minlength=72)
    for fraction, every_image in (("0", True), ("0.1", False)):
        yielded.clear()
        mr.main(argv + ["--val-fraction", fraction, "--out-dir", str(tmp_path / fraction)])  # one epoch
        seen = torch.cat(yielded)
        assert (len(seen) == 192) == every_image, fraction
        assert torch.equal(torch.bincount(seen, minlength=72), expected) == every_image


def test_bad_input_fails_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--coarse-level"):
        mr.main(TINY + ["--depth", "11", "--coarse-level", "nope", "--out-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit):
        mr.get_args(["--depth", "12"])  # not 9n+2
    for bad in (["--val-fraction", "1"], ["--tasks", "2/2"], ["--tasks", "x"], ["--analyze-only"]):
        with pytest.raises(SystemExit):
            mr.get_args(bad)
