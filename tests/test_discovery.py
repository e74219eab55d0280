"""rank_suspects against a hand computation on a tiny float64 model (issue #25)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_sa_unlearn.discovery import rank_suspects


def tiny(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()


def test_scores_are_the_rise_of_each_samples_loss_under_its_trained_label():
    torch.manual_seed(0)
    x, y = torch.randn(50, 2, 2).double(), torch.randint(0, 3, (50,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # its shuffling is not used
    after, before = tiny(1), tiny(2)
    suspects = rank_suspects(after, loader, before=before)
    with torch.no_grad():
        by_hand = F.cross_entropy(after(x), y, reduction="none") - F.cross_entropy(before(x), y, reduction="none")
    assert sorted(suspects.positions.tolist()) == list(range(50))
    torch.testing.assert_close(suspects.scores, by_hand[suspects.positions], rtol=1e-12, atol=1e-12)
    assert torch.all(suspects.scores[:-1] >= suspects.scores[1:])
    assert suspects.top(5).tolist() == torch.argsort(by_hand, descending=True)[:5].tolist()
    alone = rank_suspects(after, loader)
    with torch.no_grad():
        torch.testing.assert_close(alone.scores, F.cross_entropy(after(x), y, reduction="none")[alone.positions])


def test_a_loader_without_positions_is_refused():
    with pytest.raises(ValueError, match="map-style DataLoader"):
        rank_suspects(tiny(0), [(torch.zeros(1, 2, 2).double(), torch.zeros(1, dtype=torch.long))])
