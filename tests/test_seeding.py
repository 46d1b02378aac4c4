"""diffattr.seeding: a random stream is a function of its integer keys only."""

import pytest
import torch

from diffattr.seeding import derive_seed, generator


def test_seeds_depend_on_every_key_and_its_position():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(1, 2, 3), derive_seed(1, 3, 2), derive_seed(1, 2), derive_seed(1, 2, 4)}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_negative_keys_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, -1)


def test_generators_with_the_same_keys_draw_the_same_numbers():
    a = torch.randn(5, generator=generator(7, 11))
    torch.randn(100)  # the global stream plays no part
    b = torch.randn(5, generator=generator(7, 11))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.randn(5, generator=generator(7, 12)))
