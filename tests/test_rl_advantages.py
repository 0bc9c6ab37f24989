"""Group-normalised advantages: values, zero signal for flat groups, ragged groups."""

import pytest
import torch

from train.rl.advantages import group_advantages


def test_group_normalisation_matches_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.5, 0.5, 1.0])
    out = group_advantages(rewards, group_size=4, eps=1e-6)
    for g in range(2):
        r = rewards[4 * g : 4 * g + 4]
        expected = (r - r.mean()) / (r.std() + 1e-6)
        torch.testing.assert_close(out.advantages[4 * g : 4 * g + 4], expected)
    assert out.zero_adv_group_frac.item() == 0


def test_all_equal_rewards_give_exact_zeros():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    out = group_advantages(rewards.reshape(4, 3))
    assert out.advantages.shape == (4, 3)
    assert torch.all(out.advantages[0] == 0) and torch.all(out.advantages[2] == 0)
    assert not torch.isnan(out.advantages).any()
    assert out.zero_adv_group_frac.item() == pytest.approx(0.5)
    assert torch.all(out.advantages[1] != 0)


def test_ragged_groups_by_id_and_singletons():
    rewards = torch.tensor([1.0, 0.0, 5.0, 1.0, 3.0])
    ids = torch.tensor([7, 7, 9, 2, 2])
    out = group_advantages(rewards, group_ids=ids, eps=0.0)
    s = torch.tensor([1.0, 0.0]).std()
    torch.testing.assert_close(out.advantages, torch.tensor([0.5 / s, -0.5 / s, 0.0, -1 / (2 * s), 1 / (2 * s)]))
    assert out.zero_adv_group_frac.item() == pytest.approx(1 / 3)  # the singleton group has no signal


def test_centre_only_and_shape_errors():
    out = group_advantages(torch.tensor([1.0, 3.0]), group_size=2, scale_by_std=False)
    torch.testing.assert_close(out.advantages, torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="do not split into groups of group_size=4"):
        group_advantages(torch.zeros(6), group_size=4)
