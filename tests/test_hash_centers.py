"""CSQ's random hash centres: far apart by the documented rule, for every seed."""

import numpy as np
import pytest

from minrr.hashing.hash_centers import hash_centers, is_hadamard_case, mean_distance, minimum_distance


def _hamming_by_bits(codes):
    """Pairwise Hamming distances counted bit by bit (independent of the +-1 dot product)."""
    return (codes[:, None, :] != codes[None, :, :]).sum(axis=2)


def test_the_rule_scales_csq_reference_thresholds():
    assert minimum_distance(64) == 20 and mean_distance(64) == 32  # CSQ: min >= 20, mean >= 32 at K = 64
    assert minimum_distance(16) == 4 and mean_distance(16) == 8
    assert minimum_distance(4) == 2  # at least distinct
    assert mean_distance(33) == pytest.approx(2 * 16 * 17 / 33)


def test_k16_c100_no_seed_gives_two_classes_one_centre():
    """A single balanced draw gave duplicate centres for about a third of seeds at K = 16, C = 100."""
    assert not is_hadamard_case(100, 16)
    for seed in range(60):
        centers = hash_centers(100, 16, seed=seed)
        assert centers.shape == (100, 16) and np.all((centers == -1).sum(axis=1) == 8)
        distance = _hamming_by_bits(centers)[np.triu_indices(100, 1)]
        assert distance.min() >= 4 and distance.mean() >= 8
    assert not np.array_equal(hash_centers(100, 16, seed=0), hash_centers(100, 16, seed=1))
    assert np.array_equal(hash_centers(100, 16, seed=5), hash_centers(100, 16, seed=5))


@pytest.mark.parametrize("n_classes, n_bits", [(300, 64), (70, 32), (20, 12)])
def test_random_centres_meet_the_rule(n_classes, n_bits):
    centers = hash_centers(n_classes, n_bits, seed=7)
    distance = _hamming_by_bits(centers)[np.triu_indices(n_classes, 1)]
    assert distance.min() >= minimum_distance(n_bits) and distance.mean() >= mean_distance(n_bits)


def test_too_few_bits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"n_classes: cannot draw 10 balanced 4-bit centres at Hamming distance >= 2"):
        hash_centers(10, 4)  # only 6 balanced 4-bit codes exist
