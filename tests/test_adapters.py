"""The batch adapter: LightningModules as people write them (dict batches, no forward, several forward
arguments, sequence outputs), checked against float64 autograd references of the user's own loss."""

import functools
import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import autograd_hessian_diagonal, flat
from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from lightning_sa_unlearn import (
    BatchAdapter,
    HeldOutMetrics,
    MonteCarloGGN,
    SharpnessAwareUnlearning,
    hessian_diagonal,
)
from lightning_sa_unlearn.adapters import AdaptedModule
from lightning_sa_unlearn.adapters.checks import check_first_batch
from lightning_sa_unlearn.updates import default_forget_loss, forget_gradient

ROOT = Path(__file__).resolve().parents[1]


def relative_error(estimate, reference):
    return float((estimate - reference).norm() / reference.norm())


class NoForward(pl.LightningModule):
    """The network in ``self.model``, called from ``training_step``; a parameter of the module's own too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def logits(self, x):
        return self.model(x) * self.temperature


class Plain(nn.Module):
    """The same function with an ordinary forward: the reference."""

    def __init__(self, module):
        super().__init__()
        self.model, self.temperature = module.model, module.temperature

    def forward(self, x):
        return self.model(x) * self.temperature


def dict_batches(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)
    return [{"label": y[:6], "features": x[:6]}, {"label": y[6:], "features": x[6:]}], x, y


def test_split_reads_keys_indices_and_several_inputs():
    batch = {"image": torch.ones(2, 3), "label": torch.tensor([1, 0]), "mask": torch.zeros(2, 3)}
    inputs, targets = BatchAdapter(inputs="image", targets="label").split(batch)
    assert inputs is batch["image"] and targets is batch["label"]
    inputs, targets = BatchAdapter(inputs=["image", "mask"], targets="label").split(batch)
    assert inputs[0] is batch["image"] and inputs[1] is batch["mask"] and targets is batch["label"]
    triple = (torch.zeros(2), torch.ones(2), torch.tensor([3, 4]))
    assert BatchAdapter(inputs=1, targets=2).split(triple)[1] is triple[2]


def test_a_key_the_batch_lacks_is_refused_with_the_keys_it_holds():
    with pytest.raises(TypeError, match=r"reads the inputs at 'x', but the batch is a dict with keys \['image', 'y'\]"):
        BatchAdapter(inputs="x", targets="y").split({"image": torch.zeros(1), "y": torch.zeros(1)})
    with pytest.raises(TypeError, match="reads the inputs at 0, but the batch is a dict"):
        BatchAdapter().split({"image": torch.zeros(1)})
    with pytest.raises(ValueError, match="outputs='channels' is not one of"):
        BatchAdapter(outputs="channels")


def test_the_view_shares_names_tensors_flags_and_functional_calls():
    module = NoForward().double()
    view = AdaptedModule(module, lambda m, x: m.logits(x))
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in module.named_parameters()]
    assert all(a is b for a, b in zip(view.parameters(), module.parameters()))
    view.eval()
    assert not module.training and not module.model[0].training
    view.train()
    assert module.training
    x = torch.randn(3, 5, dtype=torch.float64)
    before = Plain(module)(x)
    doubled = {n: 2 * p.detach() for n, p in module.named_parameters()}
    torch.testing.assert_close(functional_call(view, doubled, (x,)), functional_call(Plain(module), doubled, (x,)))
    assert torch.equal(view(x), before)  # the module's own tensors are back after the call
    assert view.logits == module.logits  # other attributes are the module's


@pytest.mark.parametrize("method", ["ggn", "exact", "empirical_fisher"])
def test_curvature_through_the_adapter_matches_the_plain_module(method):
    """A module without forward, fed dict batches: the same diagonal as the plain module on (x, y) tuples."""
    module = NoForward().double().eval()
    adapter = BatchAdapter(inputs="features", targets="label", forward="logits")
    batches, x, y = dict_batches()
    view = adapter.view(module)
    found = flat(hessian_diagonal(view, [adapter.split(b) for b in batches], method=method))
    reference = flat(hessian_diagonal(Plain(module), [(x[:6], y[:6]), (x[6:], y[6:])], method=method))
    assert relative_error(found, reference) < 1e-12
    if method == "exact":  # and the Hessian itself, from autograd
        assert relative_error(found, autograd_hessian_diagonal(Plain(module), x, y)) < 1e-10


class TwoArgumentTokens(nn.Module):
    """As Lightning's demo Transformer: ``forward(inputs, target)`` returns log-probabilities ``[B·T, V]``."""

    def __init__(self, vocabulary=5, width=4):
        super().__init__()
        torch.manual_seed(0)
        self.source, self.target = nn.Embedding(vocabulary, width), nn.Embedding(vocabulary, width)
        self.decoder = nn.Linear(width, vocabulary)
        self.vocabulary = vocabulary

    def forward(self, inputs, target):
        hidden = torch.relu(self.source(inputs) + self.target(target.roll(1, dims=1)))
        return F.log_softmax(self.decoder(hidden), dim=-1).view(-1, self.vocabulary)


def token_batch(n=6, length=3, vocabulary=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, vocabulary, (n, length), generator=g)
    return inputs, torch.randint(0, vocabulary, (n, length), generator=g)


TOKENS = BatchAdapter(inputs=[0, 1], targets=1, outputs="flattened")


def users_loss(model, inputs, target):
    """The demo's training loss, written as the user wrote it: nll_loss over every token."""
    return F.nll_loss(model(inputs, target), target.view(-1))


@pytest.mark.parametrize("method", ["ggn", "exact", "hutchinson"])
def test_token_level_curvature_is_the_hessian_of_the_users_token_loss(method):
    """Logits linear in each parameter between ReLUs, so the Hessian diagonal is the GGN diagonal."""
    model = TwoArgumentTokens().double().eval()
    inputs, target = token_batch()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector):
        params = dict(zip(names, torch.split(vector, [s.numel() for s in shapes])))
        params = {n: v.reshape(s) for (n, v), s in zip(params.items(), shapes)}
        return users_loss(lambda *a: functional_call(model, params, a), inputs, target)

    reference = torch.autograd.functional.hessian(loss, start).diagonal()
    options = {"num_probes": 3000, "generator": torch.Generator().manual_seed(0)} if method == "hutchinson" else {}
    batches = [TOKENS.split((inputs[:4], target[:4])), TOKENS.split((inputs[4:], target[4:]))]
    found = flat(hessian_diagonal(TOKENS.view(model), batches, loss_fn=F.nll_loss, method=method, **options))
    assert relative_error(found, reference) < (0.1 if method == "hutchinson" else 1e-10)


def test_the_forget_gradient_through_the_adapter_is_that_of_the_users_loss():
    """Eq. 7 in sum reduction, one term per sequence: B · (L(corrected) − L(forget)) with the user's own loss."""
    model = TwoArgumentTokens().double().eval()
    inputs, wrong = token_batch()
    right = (wrong + 1) % 5
    found = forget_gradient(
        TOKENS.view(model),
        [TOKENS.split((inputs, wrong))],
        [TOKENS.split((inputs, right))],
        forget_loss=functools.partial(default_forget_loss, loss_fn=F.nll_loss),
    )
    model.zero_grad()
    ((users_loss(model, inputs, right) - users_loss(model, inputs, wrong)) * len(inputs)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(found[name], p.grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------ end to end


class TinyTransformer(LightningTransformer):
    """Lightning's demo, with a tiny vocabulary and no WikiText-2 download."""

    def __init__(self, vocab_size=7):
        super().__init__(vocab_size=vocab_size)
        self.model = Transformer(vocab_size=vocab_size, ninp=16, nhead=2, nhid=16, nlayers=1, dropout=0.0)

    def prepare_data(self):
        pass


class SyntheticTokens(pl.LightningDataModule):
    """``(inputs, target)`` token pairs; the target is the next token of a fixed rule, wrong on the forget set."""

    def __init__(self, n=96, forget=16, length=6, vocabulary=7):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inputs = torch.randint(0, vocabulary, (n, length), generator=g)
        self.right = (self.inputs + 1) % vocabulary
        self.trained = self.right.clone()
        self.trained[:forget] = (self.right[:forget] + 3) % vocabulary
        self.forget = forget

    def loader(self, inputs, target):
        return DataLoader(list(zip(inputs, target)), batch_size=16)

    def train_dataloader(self):
        return self.loader(self.inputs, self.trained)

    def forget_dataloader(self):
        return self.loader(self.inputs[: self.forget], self.trained[: self.forget])

    def corrected_dataloader(self):
        return self.loader(self.inputs[: self.forget], self.right[: self.forget])

    def val_dataloader(self):
        return self.loader(self.inputs[self.forget : 56], self.right[self.forget : 56])

    def test_dataloader(self):
        return self.loader(self.inputs[56:], self.right[56:])


def fit(module, datamodule, callbacks):
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule)
    return trainer


def changed_parameters(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


class Snapshot(pl.Callback):
    """The weights as training left them, just before the unlearning callback runs."""

    def on_train_end(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_lightning_transformer_end_to_end_per_token():
    torch.manual_seed(0)
    snapshot = Snapshot()
    callback = SharpnessAwareUnlearning(
        batch_adapter=TOKENS, loss_fn=F.nll_loss, curvature=MonteCarloGGN(samples=32), selection="last", verbose=False
    )
    module = TinyTransformer()
    fit(module, SyntheticTokens(), [snapshot, callback])
    report = callback.report
    assert report.selected_layers == ["model.decoder"]
    assert {f"accuracy_class_{k}" for k in range(7)} <= set(report.heldout_before)  # one class per token
    assert changed_parameters(snapshot.weights, module) <= {"model.decoder.weight", "model.decoder.bias"}
    assert report.tau is not None


def load_example():
    spec = importlib.util.spec_from_file_location(
        "dict_batches_no_forward", ROOT / "examples" / "dict_batches_no_forward.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_example_unlearns_a_torchvision_classifier_without_forward_fed_dict_batches():
    example = load_example()
    callback = example.main(["--train", "32", "--epochs", "1", "--curvature-samples", "8"])
    assert callback.report.selected_layers == ["model.fc"]
    assert set(callback.report.heldout_after) >= {"accuracy", "loss"}


def test_a_wrong_adapter_fails_before_training():
    example = load_example()
    steps = []

    class Counting(example.ResNetClassifier):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    for adapter, message in [
        ("tuple", "reads the inputs at 0, but the batch is a dict with keys \\['image', 'label'\\]"),
        (BatchAdapter(inputs="image", targets="label"), "could not be called for logits.*forward='model'"),
    ]:
        callback = SharpnessAwareUnlearning(batch_adapter=adapter, verbose=False)
        with pytest.raises(TypeError, match=message):
            fit(Counting(), example.FlippedImages(train=32, flip=4), [callback])
    assert steps == []


def test_an_evaluation_on_its_own_reads_batches_through_the_adapter():
    """Held-out accuracy of the no-forward module on dict batches, against argmax by hand."""
    example = load_example()
    datamodule = example.FlippedImages(train=32, flip=4)
    module = example.ResNetClassifier().eval()
    metrics = HeldOutMetrics()(module, datamodule, batch_adapter=example.ADAPTER)["heldout"]
    images = torch.stack([s["image"] for s in datamodule.test_set])
    labels = torch.stack([s["label"] for s in datamodule.test_set])
    with torch.no_grad():
        expected = float((module.model(images).argmax(1) == labels).double().mean())
    assert metrics["accuracy"] == pytest.approx(expected)


class AugmentedImages(torch.utils.data.Dataset):
    """An augmentation that draws from Python's and numpy's generators, as many do."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        import random

        import numpy as np

        sample = self.data[index]
        shift = random.random() + float(np.random.rand())
        return {"image": sample["image"] + shift, "label": sample["label"]}


class LateForgetSet(pl.LightningDataModule):
    """Builds its forget set in setup('test'), as per-stage datamodules do; its dataset augments at random."""

    def __init__(self, example):
        super().__init__()
        self.inner = example.FlippedImages(train=32, flip=4)

    def setup(self, stage):
        if stage == "test":
            self.forget_set = torch.utils.data.Subset(self.inner.train_set, range(4))

    def train_dataloader(self):
        return DataLoader(AugmentedImages(self.inner.train_set), batch_size=16, shuffle=True)

    def forget_dataloader(self):
        return DataLoader(self.forget_set, batch_size=64)

    def corrected_dataloader(self):
        return self.inner.corrected_dataloader()

    def val_dataloader(self):
        return self.inner.val_dataloader()

    def test_dataloader(self):
        return self.inner.test_dataloader()


class AugmentedForgetSet(LateForgetSet):
    def setup(self, stage):
        self.forget_set = AugmentedImages(torch.utils.data.Subset(self.inner.train_set, range(4)))


def trained_weights(example, datamodule, with_callback):
    import random

    import numpy as np

    pl.seed_everything(0, verbose=False)
    random.seed(0)
    np.random.seed(0)
    snapshot = Snapshot()
    callback = SharpnessAwareUnlearning(batch_adapter=example.ADAPTER, selection="last", verbose=False)
    fit(example.ResNetClassifier(), datamodule, [snapshot, callback] if with_callback else [snapshot])
    return snapshot.weights


@pytest.mark.parametrize("datamodule", [LateForgetSet, AugmentedForgetSet])
def test_the_check_before_training_leaves_training_as_it_was(datamodule):
    """A forget set built later is checked later; the check's reads draw nothing from torch, random or numpy."""
    example = load_example()
    with_check = trained_weights(example, datamodule(example), True)
    without = trained_weights(example, datamodule(example), False)
    assert all(torch.equal(with_check[name], without[name]) for name in without)


def test_adapter_errors_name_the_adapter():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    batch = [(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))]
    adapter = BatchAdapter(inputs=[0, 1], targets=2)
    with pytest.raises(
        TypeError, match=r"through BatchAdapter\(inputs=\[0, 1\].*inputs= lists the forward's arguments"
    ):
        check_first_batch(adapter.view(Plain()), [adapter.split(b) for b in batch], F.cross_entropy, adapter)
    stable = BatchAdapter(forward=users_loss)
    assert "test_adapters.users_loss" in repr(stable) and "0x" not in repr(stable)


@pytest.mark.parametrize("loss_fn", [F.mse_loss, F.binary_cross_entropy_with_logits])
def test_a_regression_loss_is_refused_before_training(loss_fn):
    example = load_example()
    callback = SharpnessAwareUnlearning(batch_adapter=example.ADAPTER, loss_fn=loss_fn, verbose=False)
    with pytest.raises(ValueError, match="the callback unlearns classifiers.*hessian_diagonal"):
        fit(example.ResNetClassifier(), example.FlippedImages(train=32, flip=4), [callback])


# ------------------------------------------------------------------------------------------ padded tokens


class TokenTagger(pl.LightningModule):
    """Per-token classes from the tokens alone, ``[B, T, V]`` (classes last), trained on targets padded with -100."""

    def __init__(self, vocabulary=7):
        super().__init__()
        torch.manual_seed(0)
        self.embedding, self.head = nn.Embedding(vocabulary, 8), nn.Linear(8, vocabulary)

    def forward(self, tokens):
        return self.head(torch.relu(self.embedding(tokens)))

    def training_step(self, batch, batch_idx):
        tokens, target = batch
        return F.cross_entropy(self.forward(tokens).movedim(-1, 1), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class PaddedTokens(SyntheticTokens):
    """The last two positions of every other sequence are padding (-100) in every split."""

    def __init__(self):
        super().__init__()
        for labels in (self.right, self.trained):
            labels[::2, -2:] = -100


def test_padded_positions_are_left_out_of_every_measurement():
    snapshot = Snapshot()
    callback = SharpnessAwareUnlearning(
        batch_adapter=BatchAdapter(outputs="classes_last"), selection="last", verbose=False, harm_guard=False
    )
    module, datamodule = TokenTagger(), PaddedTokens()
    fit(module, datamodule, [snapshot, callback])
    assert changed_parameters(snapshot.weights, module) <= {"head.weight", "head.bias"}
    tokens, target = datamodule.inputs[56:], datamodule.right[56:]
    with torch.no_grad():
        predicted = module(tokens).argmax(-1)
    kept = target != -100
    expected = float((predicted[kept] == target[kept]).double().mean())
    assert callback.report.heldout_after["accuracy"] == pytest.approx(expected)
    assert callback.report.heldout_after["loss"] == pytest.approx(
        float(F.cross_entropy(module(tokens).movedim(-1, 1), target)), rel=1e-5
    )


def test_per_sample_losses_average_each_sequence_over_its_tokens_that_are_not_padding():
    from lightning_sa_unlearn.guard import sample_losses

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 5, 4, generator=g), torch.randint(0, 5, (3, 4), generator=g)
    target[0, 2:] = -100

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return logits[x] * self.weight

    measured = sample_losses(Fixed(), [(torch.arange(3), target)])
    by_hand = [F.cross_entropy(logits[i : i + 1], target[i : i + 1]) for i in range(3)]  # mean over kept tokens
    torch.testing.assert_close(measured.losses, torch.stack(by_hand).double())
    assert measured.labels.tolist() == target[target != -100].tolist()
