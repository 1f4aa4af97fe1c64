import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_stthree import ST3PruningCallback


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target_sparsity": 1.5}, ValueError, r"`target_sparsity` must be in \[0, 1\), got 1.5"),
        ({"target_sparsity": 1.0}, ValueError, r"`target_sparsity` must be in \[0, 1\), got 1.0"),
        ({"target_sparsity": -0.1}, ValueError, r"`target_sparsity` must be in \[0, 1\), got -0.1"),
        ({"target_sparsity": "0.9"}, TypeError, r"`target_sparsity` must be a number in \[0, 1\), got '0.9'"),
        ({"start": 50, "end": 10}, ValueError, r"`start` must be <= `end`, got start=50 and end=10"),
        ({"start": 0.6, "end": 0.5}, ValueError, r"`start` must be <= `end`, got start=0.6 and end=0.5"),
        ({"start": -1}, ValueError, r"`start` must be >= 0 optimizer steps, got -1"),
        ({"end": 1.5}, ValueError, r"`end` as a float is a fraction of the run and must be in \[0, 1\], got 1.5"),
        ({"start": True}, TypeError, r"`start` must be an int \(optimizer steps\) or a float"),
        ({"end": "80"}, TypeError, r"`end` must be an int \(optimizer steps\) or a float"),
        ({"power": 0}, ValueError, r"`power` must be in \(0, inf\), got 0"),
        ({"power": -3.0}, ValueError, r"`power` must be in \(0, inf\), got -3.0"),
        ({"power": float("inf")}, ValueError, r"`power` must be a finite number in \(0, inf\), got inf"),
        ({"power": "3"}, TypeError, r"`power` must be a number in \(0, inf\), got '3'"),
        ({"criterion": "l2"}, ValueError, r"`criterion` must be one of \('l1', 'l1_std'\), got 'l2'"),
        ({"soft_threshold": "yes"}, TypeError, r"`soft_threshold` must be True, False or None, got 'yes'"),
        ({"shrinkage": "l0"}, ValueError, r"`shrinkage` must be one of \('soft', 'hard', 'firm', 'half'\), got 'l0'"),
        ({"shrinkage": 0}, TypeError, r"`shrinkage` must be one of \('soft', 'hard', 'firm', 'half'\), got 0"),
        ({"shrinkage": "firm", "soft_threshold": False}, ValueError, r"`soft_threshold=False` contradicts"),
        ({"firm_ratio": 0.5}, ValueError, r"`firm_ratio` must be in \(1, inf\), got 0.5"),
        ({"firm_ratio": "2"}, TypeError, r"`firm_ratio` must be a number in \(1, inf\), got '2'"),
        ({"straight_through": 1}, TypeError, r"`straight_through` must be True or False, got 1"),
        ({"rescale": None}, TypeError, r"`rescale` must be True or False, got None"),
        ({"compile_kernels": "yes"}, TypeError, r"`compile_kernels` must be True, False or None, got .yes."),
        ({"log_layer_sparsity": 0}, TypeError, r"`log_layer_sparsity` must be True or False, got 0"),
        ({"update_every": 0}, ValueError, r"`update_every` must be an int >= 1 \(optimizer steps\), got 0"),
        ({"update_every": 2.0}, TypeError, r"`update_every` must be an int >= 1 \(optimizer steps\), got 2.0"),
        ({"on_nonfinite": "ignore"}, ValueError, r"`on_nonfinite` must be one of \('raise', 'warn'\), got 'ignore'"),
        ({"include_types": ["Linear", "LSTM"]}, ValueError, r"`include_types` has unknown layer types \['LSTM'\]"),
        ({"include_types": []}, ValueError, r"`include_types` must name at least one of"),
        ({"include_types": "Linear"}, TypeError, r"`include_types` must be a list of layer type names, got 'Linear'"),
        ({"exclude": "fc"}, TypeError, r"`exclude` must be a list of glob patterns on module names"),
        ({"exclude": [""]}, TypeError, r"`exclude` must be a list of glob patterns on module names"),
        ({"include_types": 5}, TypeError, r"`include_types` must be a list of layer type names, got 5"),
        ({"include_types": ["Linear", 3]}, TypeError, r"`include_types` must be a list of layer type names"),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ST3PruningCallback(**kwargs)


def test_valid_arguments_are_kept() -> None:
    cb = ST3PruningCallback(0.95, start=10, end=200, power=2, criterion="l1_std", include_types=["Conv2d"])
    assert (cb.target_sparsity, cb.start, cb.end, cb.power, cb.criterion) == (0.95, 10, 200, 2.0, "l1_std")
    assert cb.include_types == ("Conv2d",)
    # Mixed int/float start and end can only be compared once the run's length is known.
    ST3PruningCallback(start=500, end=0.5)


def test_exclude_pattern_matching_nothing_is_an_error() -> None:
    trainer = quiet_trainer(max_steps=1, callbacks=[ST3PruningCallback(exclude=["classifier"])])
    with pytest.raises(ValueError, match=r"`exclude` patterns \['classifier'\] match no prunable layer.*'conv', 'fc'"):
        trainer.fit(TinyNet(), random_loader(2))


def test_model_without_prunable_layers_raises_at_setup() -> None:
    class RecurrentOnly(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            del self.conv, self.fc
            self.rnn = nn.GRU(8, 4)

    trainer = quiet_trainer(max_steps=1, callbacks=[ST3PruningCallback()])
    with pytest.raises(MisconfigurationException, match=r"found no layer to prune in RecurrentOnly.*HINT"):
        trainer.fit(RecurrentOnly(), random_loader(2))


def test_fraction_with_unbounded_run_raises_at_setup() -> None:
    cb = ST3PruningCallback(start=0.1, end=0.5)
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1, callbacks=[cb])
    with pytest.raises(MisconfigurationException, match=r"`start=0.1`, `end=0.5` as a fraction.*HINT: set"):
        trainer.fit(TinyNet(), random_loader(2))
    assert cb.layers == {}  # raised before touching the model


def test_fraction_with_iterable_of_unknown_length_raises() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            for _ in range(4):
                yield torch.randn(3, 8, 8), torch.tensor(1)

    trainer = quiet_trainer(max_epochs=2, callbacks=[ST3PruningCallback(start=0, end=0.5)])
    with pytest.raises(MisconfigurationException, match=r"`end=0.5` as a fraction of the run.*no known length"):
        trainer.fit(TinyNet(), torch.utils.data.DataLoader(Stream(), batch_size=2))


def test_mixed_int_and_fraction_ending_before_start_raises() -> None:
    trainer = quiet_trainer(max_steps=10, callbacks=[ST3PruningCallback(start=8, end=0.5)])
    with pytest.raises(MisconfigurationException, match=r"starts after it ends: start=8 -> step 8, end=0.5 -> step 5"):
        trainer.fit(TinyNet(), random_loader(10))


def test_two_callbacks_on_the_same_layers_raise() -> None:
    trainer = quiet_trainer(
        max_steps=1, callbacks=[ST3PruningCallback(0.5), ST3PruningCallback(0.8, include_types=["Linear"])]
    )
    with pytest.raises(
        MisconfigurationException,
        match=r"Two sparse-training callbacks \(ST3PruningCallback and ST3PruningCallback\) prune the same "
        r"layers \['fc'\]",
    ):
        trainer.fit(TinyNet(), random_loader(2))


def test_layer_with_a_foreign_parametrization_raises() -> None:
    model = TinyNet()
    nn.utils.parametrizations.weight_norm(model.fc)
    trainer = quiet_trainer(max_steps=1, callbacks=[ST3PruningCallback()])
    message = r"Layer `fc`: `weight` already has the parametrizations \['_WeightNorm'\].*HINT: add 'fc' to `exclude`"
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(model, random_loader(2))


def test_settings_can_be_assigned_after_construction_with_the_same_checks() -> None:
    cb = ST3PruningCallback(0.9, start=0, end=10)
    cb.target_sparsity = 0.95
    cb.end = 0.5
    cb.criterion = "l1_std"
    cb.last_update_step = -1
    assert (cb.target_sparsity, cb.end, cb.criterion, cb.schedule.end) == (0.95, 0.5, "l1_std", 0.5)
    with pytest.raises(ValueError, match=r"`target_sparsity` must be in \[0, 1\), got 1.5"):
        cb.target_sparsity = 1.5
    with pytest.raises(ValueError, match=r"`start` must be <= `end`, got start=0.8 and end=0.5"):
        cb.start = 0.8
    with pytest.raises(ValueError, match=r"`criterion` must be one of \('l1', 'l1_std'\), got 'l2'"):
        cb.criterion = "l2"
    with pytest.raises(TypeError, match=r"`last_update_step` must be an int >= -1, got 2.0"):
        cb.last_update_step = 2.0
    assert (cb.target_sparsity, cb.start, cb.criterion) == (0.95, 0, "l1_std")  # a refused value changes nothing


def test_a_setting_changed_mid_run_applies_to_the_resolved_schedule() -> None:
    cb = ST3PruningCallback(0.9, start=0.0, end=0.5)
    cb.schedule.resolve(100)
    cb.target_sparsity = 0.5
    assert cb.schedule.resolved
    assert cb.scheduled_sparsity(50) == 0.5
