"""Joint image/mask augmentation: alignment, exact labels, rotations, colour jitter, determinism."""

from __future__ import annotations

import pytest
import torch

from privfl.data.augment import JointAugment, dhunet_augment


def _sample(size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 4, (size, size), generator=g)
    image = torch.rand(3, size, size, generator=g)
    return image, mask


def _encoded(size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose colour is its mask class: class / 3 on all three channels."""
    _, mask = _sample(size, seed)
    image = (mask.float() / 3).expand(3, -1, -1).clone()
    return image, mask


def test_mask_stays_aligned_with_image_and_exact():
    image, mask = _encoded()
    aug = JointAugment(hsv=(0.0, 0.0, 0.0))
    torch.manual_seed(0)
    for _ in range(200):
        img, msk = aug(image, mask)
        assert msk.dtype == torch.int64 and img.dtype == image.dtype
        assert img.shape == image.shape and msk.shape == mask.shape
        assert set(msk.unique().tolist()) == set(mask.unique().tolist())
        assert torch.equal(
            torch.bincount(msk.flatten(), minlength=4), torch.bincount(mask.flatten(), minlength=4)
        )
        assert torch.equal(img, (msk.float() / 3).expand(3, -1, -1))


def test_all_flips_equal_double_flip():
    image, mask = _sample()
    img, msk = JointAugment(hflip=1.0, vflip=1.0, rot90=False, hsv=(0.0, 0.0, 0.0))(image, mask)
    assert torch.equal(img, image.flip(-1).flip(-2))
    assert torch.equal(msk, mask.flip(-1).flip(-2))


def test_each_rotation_occurs_exactly():
    image, mask = _sample()
    rotations = {k: (torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))) for k in range(4)}
    aug = JointAugment(hflip=0.0, vflip=0.0, rot90=True, hsv=(0.0, 0.0, 0.0))
    torch.manual_seed(1)
    seen = set()
    for _ in range(64):
        img, msk = aug(image, mask)
        ks = [k for k, (ri, rm) in rotations.items() if torch.equal(img, ri) and torch.equal(msk, rm)]
        assert len(ks) == 1
        seen.add(ks[0])
    assert seen == {0, 1, 2, 3}


def test_hsv_jitter_changes_image_only():
    image, mask = _sample(seed=3)
    aug = JointAugment(hflip=0.0, vflip=0.0, rot90=False, hsv=(0.1, 0.3, 0.3))
    torch.manual_seed(2)
    changed = 0
    for _ in range(10):
        img, msk = aug(image, mask)
        assert torch.equal(msk, mask)
        assert img.min() >= 0 and img.max() <= 1
        changed += not torch.allclose(img, image)
    assert changed == 10


def test_output_in_unit_range_with_defaults():
    image, mask = _sample(seed=4)
    image[:, :4] = 1.0  # saturated pixels: brightness × 1.2 must clamp
    image[:, 4:8] = 0.0
    aug = dhunet_augment()
    torch.manual_seed(3)
    for _ in range(20):
        img, msk = aug(image, mask)
        assert img.min() >= 0 and img.max() <= 1 and img.dtype == torch.float32
        assert msk.dtype == torch.int64


def test_deterministic_under_manual_seed():
    image, mask = _sample(seed=5)
    aug = dhunet_augment()
    torch.manual_seed(123)
    a = [aug(image, mask) for _ in range(5)]
    torch.manual_seed(123)
    b = [aug(image, mask) for _ in range(5)]
    for (ia, ma), (ib, mb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)


def test_generator_draws_are_reproducible_and_leave_global_rng_alone():
    image, mask = _sample(seed=6)
    aug = dhunet_augment()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = aug(image, mask, torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), before)
    b = aug(image, mask, torch.Generator().manual_seed(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_augments_each_sample_and_keeps_alignment():
    images, masks = zip(*(_encoded(seed=s) for s in range(6)))
    images, masks = torch.stack(images), torch.stack(masks)
    torch.manual_seed(4)
    img, msk = JointAugment(hsv=(0.0, 0.0, 0.0))(images, masks)
    assert img.shape == images.shape and msk.shape == masks.shape
    assert torch.equal(img, (msk.float() / 3).unsqueeze(1).expand(-1, 3, -1, -1))


def test_non_square_with_rot90_raises():
    image, mask = torch.rand(3, 8, 12), torch.zeros(8, 12, dtype=torch.int64)
    with pytest.raises(ValueError, match="square"):
        JointAugment()(image, mask)
    img, msk = JointAugment(rot90=False)(image, mask)
    assert img.shape == (3, 8, 12) and msk.shape == (8, 12)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        JointAugment(hflip=1.5)
    with pytest.raises(ValueError):
        JointAugment(hsv=(0.6, 0.1, 0.1))
    with pytest.raises(ValueError, match="does not match"):
        JointAugment()(torch.rand(3, 8, 8), torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(TypeError):
        JointAugment()(torch.rand(3, 8, 8), torch.zeros(8, 8))
