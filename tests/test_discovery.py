"""rank_suspects against a hand computation on a tiny float64 model (issue #25)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorDataModule
from test_iterated import NAMES, float64_model, forget_loss_by_hand, unlearn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_sa_unlearn import FirstOrder, FixedStep, PoisonedLabelDataModule
from lightning_sa_unlearn.discovery import ExtendedForgetData, rank_suspects


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


def test_models_that_differ_in_their_last_layer_share_one_pass_through_the_layers_below():
    """The stored-feature path gives the scores of two whole forward passes, at one whole pass plus two heads."""
    torch.manual_seed(0)
    x, y = torch.randn(70, 4).double(), torch.randint(0, 3, (70,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    after = copy.deepcopy(before)
    with torch.no_grad():
        after[2].weight.add_(torch.randn(3, 5).double())
    suspects = rank_suspects(after, loader, before=before)
    with torch.no_grad():
        by_hand = F.cross_entropy(after(x), y, reduction="none") - F.cross_entropy(before(x), y, reduction="none")
    torch.testing.assert_close(suspects.scores, by_hand[suspects.positions], rtol=1e-12, atol=1e-12)
    assert suspects.passes == {"forward": 70, "forward_above": 140}
    with torch.no_grad():
        after[0].bias.add_(1.0)  # a change in the first layer: nothing is shared, two whole passes
    whole = rank_suspects(after, loader, before=before)
    with torch.no_grad():
        by_hand = F.cross_entropy(after(x), y, reduction="none") - F.cross_entropy(before(x), y, reduction="none")
    assert whole.passes == {"forward": 140}
    torch.testing.assert_close(whole.scores, by_hand[whole.positions], rtol=1e-12, atol=1e-12)


def test_flagged_samples_are_those_whose_trained_label_lost_half_its_probability():
    torch.manual_seed(1)
    x, y = torch.randn(60, 2, 2).double(), torch.randint(0, 3, (60,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    after, before = tiny(3), tiny(4)
    suspects = rank_suspects(after, loader, before=before)
    with torch.no_grad():
        now, then = after(x).softmax(1), before(x).softmax(1)
    picked = lambda p: p.gather(1, y[:, None]).squeeze(1)  # noqa: E731
    halved = (picked(now) < picked(then) / 2).nonzero().flatten()
    assert 0 < len(halved) < 60
    assert sorted(suspects.candidates().tolist()) == halved.tolist()
    other = now.scatter(1, y[:, None], -1.0).argmax(1)  # the most probable class that is not the trained one
    assert torch.equal(suspects.candidate_labels(), other[suspects.candidates()])
    assert not torch.any(suspects.candidate_labels() == y[suspects.candidates()])
    alone = rank_suspects(after, loader)  # without `before`: the trained label has less than even odds
    assert sorted(alone.candidates().tolist()) == (picked(now) < 0.5).nonzero().flatten().tolist()
    assert rank_suspects(after, loader, threshold=float("inf")).candidates().numel() == 0


def test_before_must_have_the_models_parameters():
    loader = DataLoader(TensorDataset(torch.zeros(4, 2, 2).double(), torch.zeros(4, dtype=torch.long)), batch_size=2)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="before must be the model as it was"):
        rank_suspects(tiny(0), loader, before=other)


def data(poison="targeted"):
    dm = PoisonedLabelDataModule(dataset="synthetic", num_poisoned=40, seed=0, discovered=0.25, poison=poison)
    dm.setup("fit")
    return dm


def test_extended_forget_data_moves_the_candidates_from_d_r_into_d_f_with_their_new_labels():
    dm = data()
    positions, labels = torch.tensor([7, 2, 30]), torch.tensor([9, 9, 1])
    extended = ExtendedForgetData(dm, positions, labels)
    retain_x, retain_y = dm.retain_set.tensors
    forget = [b for b in extended.forget_dataloader()]
    corrected = [b for b in extended.corrected_dataloader()]
    fx, fy = torch.cat([b[0] for b in forget]), torch.cat([b[1] for b in forget])
    cx, cy = torch.cat([b[0] for b in corrected]), torch.cat([b[1] for b in corrected])
    known_x, known_y = dm.forget_set.tensors
    assert torch.equal(fx, torch.cat([known_x, retain_x[positions]])) and torch.equal(fx, cx)
    assert torch.equal(fy, torch.cat([known_y, retain_y[positions]]))  # D_f: the labels the model was trained on
    assert torch.equal(cy, torch.cat([dm.corrected_set.tensors[1], labels]))  # D̃_f: the new labels
    assert [len(b[1]) for b in forget] == [len(b[1]) for b in corrected]
    kept = torch.ones(len(retain_x), dtype=torch.bool)
    kept[positions] = False
    rx = torch.stack([x for x, _ in extended.retain_set])
    assert torch.equal(rx, retain_x[kept]) and len(rx) == len(retain_x) - 3
    assert isinstance(extended.retain_dataloader().sampler, RandomSampler)  # shuffled, as the source's
    assert extended.train_dataloader().dataset is dm.train_set and extended.target_class == dm.target_class


@pytest.mark.parametrize(
    "positions, labels, message",
    [
        ([1, 1], [0, 0], "distinct positions"),
        ([-1], [0], "distinct positions"),
        ([10_000], [0], "distinct positions"),
        ([1, 2], [0], "one label per position"),
    ],
)
def test_extended_forget_data_refuses_positions_it_cannot_move(positions, labels, message):
    with pytest.raises(ValueError, match=message):
        ExtendedForgetData(data(), torch.tensor(positions), torch.tensor(labels))


def test_sample_deletion_has_no_labels_to_extend():
    dm = PoisonedLabelDataModule(dataset="synthetic", num_poisoned=40, seed=0, poison="deletion")
    dm.setup("fit")
    with pytest.raises(ValueError, match="sample deletion has no labels"):
        ExtendedForgetData(dm, torch.tensor([0]), torch.tensor([1]))


def test_labels_per_position_are_refused():
    loader = DataLoader(TensorDataset(torch.zeros(4, 2, 2).double(), torch.zeros(4, 2, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="one class label each"):
        rank_suspects(tiny(0), loader)


def test_a_second_round_on_extended_forget_data_takes_the_closed_form_over_the_moved_samples_too():
    """Paper eq. 7 by hand over D_f + the moved samples: Σ ℓ(x, new label) − Σ ℓ(x, trained label) added."""
    datamodule, tau = TensorDataModule(), 0.003
    positions, labels = torch.tensor([4, 0, 17]), torch.tensor([2, 1, 0])
    model = float64_model()
    unlearn(model, ExtendedForgetData(datamodule, positions, labels), FirstOrder(FixedStep(tau)))
    by_hand = float64_model()
    moved = datamodule.num_forget + positions  # retain position p is sample num_forget + p of the tensors
    x = datamodule.x.double()
    params = dict(by_hand.named_parameters())
    loss = (
        forget_loss_by_hand(by_hand, datamodule)
        + F.cross_entropy(by_hand(x[moved]), labels, reduction="sum")
        - F.cross_entropy(by_hand(x[moved]), datamodule.poisoned[moved], reduction="sum")
    )
    gradient = torch.autograd.grad(loss, [params[n] for n in NAMES])
    for name, g in zip(NAMES, gradient):
        torch.testing.assert_close(dict(model.named_parameters())[name], params[name] - tau * g, rtol=1e-10, atol=1e-12)


class Branchy(torch.nn.Module):
    """Not a chain: a traced split (torch.fx) shares its trunk; BatchNorm and dropout behave as in eval mode."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.trunk(x)
        return self.head(torch.relu(h) + 0.1 * h)


def test_a_traced_split_of_a_model_in_train_mode_scores_as_in_eval_mode_and_keeps_its_modes():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4).double(), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = Branchy().double()
    with torch.no_grad():
        before.trunk[1].running_mean.uniform_(-1, 1)
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.head.weight.add_(torch.randn(3, 6).double())
    state = {k: v.clone() for k, v in before.state_dict().items()}
    suspects = rank_suspects(after.train(), loader, before=before.train())
    assert suspects.passes == {"forward": 40, "forward_above": 80}
    assert after.training and before.training and after.trunk[2].training
    assert all(torch.equal(state[k], v) for k, v in before.state_dict().items())
    with torch.no_grad():
        by_hand = F.cross_entropy(after.eval()(x), y, reduction="none") - F.cross_entropy(
            before.eval()(x), y, reduction="none"
        )
    torch.testing.assert_close(suspects.scores, by_hand[suspects.positions], rtol=1e-12, atol=1e-12)


def test_an_empty_loader_is_refused():
    loader = DataLoader(TensorDataset(torch.zeros(0, 2, 2).double(), torch.zeros(0, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="empty loader"):
        rank_suspects(tiny(0), loader)
