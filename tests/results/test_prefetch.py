"""`layer_prefetch`: layer l's misses predicted from layer l-1 at the same step, on hand-made traces whose
counts are known, and the step-by-step simulation's miss sets count what `policy_cache_loads` counts."""

import numpy as np

from nosa.results.cache_sim import layer_prefetch, policy_cache_loads, policy_cache_steps


def test_a_layer_that_repeats_the_previous_layers_choice_is_fully_predicted():
    # Two layers, one head, K = 2, cache 2 (= K: a block that leaves is gone). Layer 0 and layer 1 select the
    # same blocks at every step, one new block a step: every miss of layer 1 is in layer 0's selection.
    steps = [[0, 1], [0, 2], [0, 3], [0, 4]]
    trace = np.array([[[s] for s in steps], [[s] for s in steps]])  # [L=2, S=4, H=1, K=2]
    row = layer_prefetch(trace, position=100, block_size=64, cache_blocks=2)["layers"][0]
    assert row["misses"] == 3
    assert row["from_selection"] == {"prefetched": 3, "useful": 3, "coverage": 1.0, "precision": 1.0}
    assert row["from_misses"]["useful"] == 3  # layer 0 loaded the same new blocks


def test_an_unrelated_layer_predicts_nothing_and_counts_its_waste():
    lower = [[[0, 1]], [[5, 6]], [[7, 8]]]
    upper = [[[0, 1]], [[0, 2]], [[0, 3]]]
    trace = np.array([lower, upper])  # [2, 3, 1, 2]
    row = layer_prefetch(trace, position=100, block_size=64, cache_blocks=2)["layers"][0]
    assert row["misses"] == 2 and row["from_selection"]["useful"] == 0
    assert row["from_selection"]["prefetched"] == 4 and row["from_selection"]["coverage"] == 0.0


def test_miss_counts_equal_the_lru_simulation_and_skip_a_tail_block_that_starts():
    g = np.random.default_rng(0)
    selection = np.stack([g.permutation(12)[:4] for _ in range(30)])
    for position in (63, 100):  # 63 + 1 = 64: step 1 starts block 1, which is then no load
        got = [len(m) for _, m in policy_cache_steps(selection, position, 64, 6, "lru")]
        assert got == policy_cache_loads(selection, position, 64, 6, "lru").tolist()
