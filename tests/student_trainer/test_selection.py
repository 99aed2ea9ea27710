"""Patch selection policies and student-to-teacher grid mapping."""

from __future__ import annotations

import pytest
import torch

from student_trainer.selection import (
    GridMap,
    get_policy,
    keep_count_for,
    select_all,
    select_random,
    select_top_saliency,
)


def test_student_policy_keeps_exactly_top_k() -> None:
    torch.manual_seed(0)
    saliency = torch.rand(4, 49)
    keep = select_top_saliency(saliency, 10)
    assert keep.shape == (4, 10)
    assert keep.dtype == torch.int64
    for row in range(4):
        expected = set(saliency[row].argsort(descending=True)[:10].tolist())
        assert set(keep[row].tolist()) == expected
        assert keep[row].tolist() == sorted(keep[row].tolist())
        kept_min = saliency[row, keep[row]].min()
        dropped = torch.ones(49, dtype=torch.bool)
        dropped[keep[row]] = False
        assert kept_min >= saliency[row, dropped].max()


def test_none_policy_keeps_all() -> None:
    keep = select_all(torch.rand(3, 16), keep_count=4)
    assert keep.shape == (3, 16)
    for row in keep:
        assert row.tolist() == list(range(16))


def test_random_policy_is_seeded() -> None:
    saliency = torch.rand(5, 36)
    first = select_random(saliency, 9, torch.Generator().manual_seed(7))
    second = select_random(saliency, 9, torch.Generator().manual_seed(7))
    other = select_random(saliency, 9, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    for row in first:
        assert len(set(row.tolist())) == 9
        assert row.tolist() == sorted(row.tolist())
        assert int(row.min()) >= 0
        assert int(row.max()) < 36


def test_random_policy_ignores_saliency() -> None:
    generator_state = torch.Generator().manual_seed(3).get_state()
    low = select_random(torch.zeros(2, 16), 4, torch.Generator().set_state(generator_state))
    high = select_random(torch.rand(2, 16), 4, torch.Generator().set_state(generator_state))
    assert torch.equal(low, high)


@pytest.mark.parametrize(
    ("num_patches", "ratio", "expected"),
    [(49, 0.5, 24), (196, 0.5, 98), (16, 1.0, 16), (16, 0.01, 1), (10, 0.25, 2)],
)
def test_keep_count_rounds_and_keeps_one(num_patches: int, ratio: float, expected: int) -> None:
    assert keep_count_for(num_patches, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_keep_ratio_outside_unit_interval_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"keep ratio must be in \(0, 1\]"):
        keep_count_for(49, ratio)


def test_policy_lookup_rejects_unknown_name() -> None:
    assert get_policy("student") is select_top_saliency
    with pytest.raises(ValueError, match="unknown masking policy 'top'"):
        get_policy("top")


def test_grid_map_same_grid_is_identity() -> None:
    saliency = torch.rand(2, 16)
    grid = GridMap((4, 4), (4, 4))
    keep = grid.select(saliency, 0.5, select_top_saliency)
    assert torch.equal(keep, select_top_saliency(saliency, 8))
    assert grid.teacher_keep_count(0.5) == 8


def test_grid_map_expands_to_finer_teacher_grid() -> None:
    grid = GridMap((2, 2), (4, 4))
    saliency = torch.tensor([[0.0, 0.9, 0.1, 0.0]])  # student patch 1: top-right quarter
    keep = grid.select(saliency, 0.25, select_top_saliency)
    assert keep.tolist() == [[2, 3, 6, 7]]
    assert grid.teacher_keep_count(0.25) == 4


def test_grid_map_pools_onto_coarser_teacher_grid() -> None:
    grid = GridMap((4, 4), (2, 2))
    saliency = torch.zeros(1, 16)
    saliency[0, [10, 11, 14, 15]] = 0.2  # bottom-right quarter of the student grid
    saliency[0, 0] = 0.5  # one strong patch in the top-left quarter
    pooled = grid.pool_to_teacher(saliency)
    torch.testing.assert_close(pooled, torch.tensor([[0.5, 0.0, 0.0, 0.8]]))
    keep = grid.select(saliency, 0.25, select_top_saliency)
    assert keep.tolist() == [[3]]


def test_grid_map_none_policy_keeps_every_teacher_patch() -> None:
    keep = GridMap((2, 2), (4, 4)).select(torch.rand(3, 4), 1.0, select_all)
    assert keep.shape == (3, 16)
    assert keep[0].tolist() == list(range(16))


@pytest.mark.parametrize(
    ("student_grid", "teacher_grid"), [((7, 7), (4, 4)), ((4, 8), (8, 4)), ((3, 3), (4, 4))]
)
def test_grid_map_rejects_unmappable_grids(student_grid: tuple, teacher_grid: tuple) -> None:
    with pytest.raises(ValueError, match="cannot be mapped"):
        GridMap(student_grid, teacher_grid)
