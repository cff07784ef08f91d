"""Auto-CEI's pure pieces: IDK detection, the curriculum reward and its initialisation, Boltzmann resampling, the
objective and the hill-climb on c1 (rlkit.methods.autocei.core)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from rlkit.methods.autocei.core import (EVAL_IDK_PHRASES, RTUNING_ENDING, CurriculumSearch, autocei_reward,
                                        boltzmann_resample, depth, ei_converged, idk_metrics, idk_reward,
                                        init_curriculum, is_idk, objective)


def test_idk_detection_uses_the_given_list_case_insensitively():
    assert is_idk("Step 1.\nSorry, I cannot.") and is_idk("I DON'T KNOW")
    assert not is_idk("I am not sure.")  # not in the reward's list
    assert is_idk("I am not sure.", EVAL_IDK_PHRASES)
    assert is_idk(RTUNING_ENDING) and is_idk(RTUNING_ENDING, EVAL_IDK_PHRASES)


def test_depth_counts_steps():
    assert depth("a.\nb.\nc") == 3
    assert depth("x = 1.\nso y = 2.\nthus", "period_newline") == 3 == len("x = 1.\nso y = 2.\nthus".split(".\n"))
    with pytest.raises(ValueError, match="not one of"):
        depth("a", "spacy")


def test_idk_reward_values_and_limits():
    c1, c2 = 4.0, 0.5
    assert idk_reward(c1, c1, c2) == 0.0
    for d in (0, 1, 2, 6, 9):
        assert idk_reward(d, c1, c2) == pytest.approx(math.tanh(c2 * (d - c1) / 2))
        assert idk_reward(d, c1, c2) == pytest.approx(-idk_reward(2 * c1 - d, c1, c2))  # odd around c1
    assert idk_reward(-1e9, c1, c2) == -1.0 and idk_reward(c1 - 30 / c2, c1, c2) == pytest.approx(-1.0, abs=1e-12)
    assert idk_reward(1e9, c1, c2) == 1.0
    assert idk_reward(3, c1, c2) < idk_reward(5, c1, c2)  # longer reasoning before IDK earns more
    assert autocei_reward(True, True, 0, c1, c2) == 1.0 and autocei_reward(False, False, 9, c1, c2) == -1.0
    assert autocei_reward(False, True, 6, c1, c2) == pytest.approx(idk_reward(6, c1, c2))


def test_curriculum_initialisation_on_a_hand_made_set():
    depths = [2, 4, 4, 4, 5, 5, 7, 9]  # population std 2, mean 5
    idk = [4, 7, 7]
    cur = init_curriculum(depths, idk)
    assert statistics.pstdev(depths) == 2.0
    assert cur.step == 0.4 and cur.c1 == pytest.approx(6 + 0.4) and cur.c2 == pytest.approx(math.log(10) / 8)
    # at d = c1 + 4 std, R = 2 / (1 + 1/10) - 1 = 9/11
    assert idk_reward(cur.c1 + 8, cur.c1, cur.c2) == pytest.approx(9 / 11)
    wide = init_curriculum([0, 10] * 4, [5])
    assert wide.step == 0.5  # min(0.2 std, 0.5)
    with pytest.raises(ValueError, match="no IDK answer"):
        init_curriculum(depths, [])
    with pytest.raises(ValueError, match="same depth"):
        init_curriculum([3, 3, 3], [3])


def test_resampling_keeps_every_original_once_and_never_a_wrong_answer():
    rewards = [1.0, -1.0, 0.3, -0.2, -1.0, 1.0]
    rng = random.Random(0)
    idx = boltzmann_resample(rewards, tau=0.4, rng=rng, n=200)
    originals, draws = idx[:4], idx[4:]
    assert originals == [0, 2, 3, 5]  # every original with R > -1, once, in order
    assert all(rewards[i] > -1 for i in idx) and len(draws) <= 200
    counts = {i: draws.count(i) for i in set(draws)}
    assert counts[0] + counts[5] > counts.get(3, 0) * 3  # high rewards are drawn far more often (tau 0.4)
    assert boltzmann_resample(rewards, 0.4, random.Random(0), n=200) == idx  # seeded
    with pytest.raises(ValueError, match="tau"):
        boltzmann_resample(rewards, 0.0, rng)


def test_metrics_and_objective():
    m = idk_metrics([True, False, False, True, False], [False, False, True, False, True])
    assert m == {"precision": pytest.approx(2 / 3), "idk_rate": 0.4, "accuracy": 0.4}
    assert objective(m["precision"], m["idk_rate"]) == pytest.approx(0.8 * 2 / 3 + 0.2 * 0.6)
    assert idk_metrics([False], [True])["precision"] == 0.0


def test_convergence_successive_and_released():
    hist = [(0.50, 0.10), (0.60, 0.20), (0.601, 0.201)]
    assert ei_converged(hist) and not ei_converged(hist, mode="released")
    assert not ei_converged(hist[:1]) and not ei_converged([(0.5, 0.1), (0.51, 0.1)])


def test_hill_climb_on_a_stub_objective_takes_the_rule_s_steps_and_stops():
    f = {3.0: 0.50, 3.5: 0.55, 4.0: 0.60, 4.5: 0.58}  # peak at 4.0
    search = CurriculumSearch(c1=3.0, step=0.5)
    seen = []
    while (c1 := search.propose()) is not None:
        seen.append(c1)
        search.report(c1, f[c1])
    assert seen == [3.0, 3.5, 4.0, 4.5]  # up while improving; 4.5 worse -> 4.0 was evaluated -> stop
    assert search.best_c1 == 4.0 and search.best_f == 0.60 and search.done
    # starting above the peak with an incumbent: worse than the start model -> go down
    down = CurriculumSearch(c1=4.5, step=0.5, initial_f=0.59)
    seen = []
    while (c1 := down.propose()) is not None:
        seen.append(c1)
        down.report(c1, f[c1])
    assert seen == [4.5, 4.0] and down.best_c1 == 4.0  # 4.5 worse -> 4.0 better -> 4.5 evaluated -> stop
    capped = CurriculumSearch(c1=0.0, step=1.0, max_curricula=3)
    n = 0
    while (c1 := capped.propose()) is not None:
        capped.report(c1, c1)  # always improving
        n += 1
    assert n == 3
    with pytest.raises(ValueError, match="expected the result"):
        CurriculumSearch(c1=1.0, step=0.5).report(2.0, 0.1)
