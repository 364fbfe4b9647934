"""Hungarian matching: optimal against brute force over all assignments; DETR cost terms by hand."""

from __future__ import annotations

import itertools

import pytest
import torch

from taskmllm.experts.matching import HungarianMatcher, MatchCosts


def _random_case(k: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(k + m, 2, generator=gen) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(k + m, 2, generator=gen) * 0.3], dim=1)
    return boxes[:k], torch.randn(k, generator=gen), boxes[k:]


@pytest.mark.parametrize("k, m, seed", [(5, 3, 0), (4, 4, 1), (6, 1, 2), (3, 2, 3)])
def test_matching_is_optimal_against_brute_force(k, m, seed):
    pred, logits, tgt = _random_case(k, m, seed)
    matcher = HungarianMatcher(MatchCosts())
    cost = matcher.cost_matrix(pred, logits, tgt)
    rows, cols = matcher.match(pred, logits, tgt)
    assert len(rows) == len(cols) == m
    assert len(set(rows.tolist())) == m and sorted(cols.tolist()) == list(range(m))
    assert rows.tolist() == sorted(rows.tolist())
    found = cost[rows, cols].sum().item()
    best = min(sum(cost[p[j], j].item() for j in range(m)) for p in itertools.permutations(range(k), m))
    assert found == pytest.approx(best, abs=1e-5)


def test_cost_terms_by_hand():
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    tgt = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    logits = torch.tensor([0.0])  # p = 0.5
    cost = HungarianMatcher(MatchCosts(objectness=1.0, l1=5.0, giou=2.0)).cost_matrix(pred, logits, tgt)
    # L1 = 0.5; IoU = 0.25 / 0.5 = 0.5 and the hull is the union, so GIoU = 0.5
    assert cost.item() == pytest.approx(-0.5 + 5 * 0.5 - 2 * 0.5)


def test_matching_prefers_the_right_box_and_handles_empty_targets():
    pred = torch.tensor([[0.6, 0.6, 0.9, 0.9], [0.1, 0.1, 0.3, 0.3]])
    logits = torch.zeros(2)
    rows, cols = HungarianMatcher(MatchCosts()).match(pred, logits, torch.tensor([[0.1, 0.1, 0.31, 0.3]]))
    assert rows.tolist() == [1] and cols.tolist() == [0]
    rows, cols = HungarianMatcher(MatchCosts()).match(pred, logits, torch.zeros(0, 4))
    assert rows.numel() == 0 and cols.numel() == 0
