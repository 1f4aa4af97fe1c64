"""What users wrote against lightning-stthree 0.1.0 still works after 0.2 arranged the package in folders.

The fixtures in tests/fixtures/v0_1_0 were written by 0.1.0 (commit d6382b8) before the move: two checkpoints of
``stthree fit`` (ST-3 sigma and STR on the digits) with the YAMLs that made them (0.1's ``class_path`` entries), a
pickled sparse-inference model, and the list of every public name of every 0.1 module.
"""

import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lightning_stthree
from lightning_stthree import _moved
from lightning_stthree.callbacks import ST3PruningCallback, STRPruningCallback
from lightning_stthree.recipes.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures" / "v0_1_0"
# {0.1 module: {public name: its parameters' names, or None for a constant}}
PUBLIC_NAMES: dict[str, dict[str, list[str] | None]] = json.loads((FIXTURES / "public_names.json").read_text())


@pytest.fixture
def fresh_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which old paths were imported and warned about in this process, so each test sees its warnings."""
    monkeypatch.setattr(_moved, "_warned", set())
    for name in list(sys.modules):
        if name in _moved.MOVED_MODULES:
            monkeypatch.delitem(sys.modules, name)
    for name in _moved.MOVED_MODULES:  # an import also sets the module as an attribute of the package
        if name.rsplit(".", 1)[1] in vars(lightning_stthree):
            monkeypatch.delattr(lightning_stthree, name.rsplit(".", 1)[1])


@pytest.mark.usefixtures("fresh_aliases")
@pytest.mark.parametrize("module_name", sorted(PUBLIC_NAMES))
def test_every_public_name_of_every_0_1_module_resolves_with_the_same_parameters(module_name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = importlib.import_module(module_name)
        missing, changed = [], []
        for name, parameters in PUBLIC_NAMES[module_name].items():
            try:
                value = getattr(module, name)
            except AttributeError as error:
                missing.append((name, str(error)))
                continue
            # New parameters may come after the old ones; positional calls of 0.1 then mean the same.
            if parameters is not None and list(inspect.signature(value).parameters)[: len(parameters)] != parameters:
                changed.append(name)
    # One name is gone on purpose, and its error says what replaces it.
    assert [name for name, _ in missing] == (["check_finite_sums"] if module_name.endswith(".selection") else [])
    assert all("removed in lightning-stthree 0.2" in message for _, message in missing)
    assert changed == []


@pytest.mark.usefixtures("fresh_aliases")
def test_an_old_module_path_warns_once_at_the_importing_line_and_gives_the_same_objects() -> None:
    with pytest.warns(
        FutureWarning, match=r"`lightning_stthree.data` moved to `lightning_stthree.recipes.data`"
    ) as seen:
        import lightning_stthree.data as old
    assert seen[0].filename == __file__
    from lightning_stthree.recipes.data import DigitsDataModule

    assert old.DigitsDataModule is DigitsDataModule
    del sys.modules["lightning_stthree.data"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("lightning_stthree.data")  # imported afresh: the warning was given already
    from lightning_stthree.callbacks.st3 import ST3PruningCallback as new

    with pytest.warns(FutureWarning, match="lightning_stthree.callback` moved to `lightning_stthree.callbacks"):
        from lightning_stthree.callback import ST3PruningCallback as via_old
    assert via_old is new


@pytest.mark.usefixtures("fresh_aliases")
def test_old_modules_work_as_attributes_star_imports_and_monkeypatch_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stthree.core import selection
    from lightning_stthree.core.threshold import global_threshold

    with pytest.warns(FutureWarning, match="`lightning_stthree.threshold` moved") as seen:
        assert lightning_stthree.threshold.global_threshold is global_threshold  # as 0.1's __init__ imported it
    assert seen[0].filename == __file__
    namespace: dict[str, object] = {}
    with pytest.warns(FutureWarning, match="`lightning_stthree.schedule` moved"):
        exec("from lightning_stthree.schedule import *", namespace)
    assert {"cubic_sparsity", "resolve_step", "DEFAULT_POWER"} <= set(namespace)
    assert "math" not in namespace  # what the module imported is not a name it defines
    with pytest.warns(FutureWarning, match="`lightning_stthree.selection` moved"):
        monkeypatch.setattr("lightning_stthree.selection.CHUNK_SIZE", 4099)
    assert selection.CHUNK_SIZE == 4099  # the real module was patched, not the alias
    monkeypatch.undo()
    assert selection.CHUNK_SIZE == 1 << 22  # and the undo put its value back


@pytest.mark.usefixtures("fresh_aliases")
def test_top_level_names_outside_all_resolve_with_a_warning_naming_their_home() -> None:
    from lightning_stthree.core.threshold import num_pruned
    from lightning_stthree.methods.parametrization import remove_sparse_parametrization

    with pytest.warns(
        FutureWarning, match=r"`lightning_stthree.num_pruned` moved to `lightning_stthree.core.threshold"
    ):
        assert lightning_stthree.num_pruned is num_pruned
    with pytest.warns(FutureWarning, match="remove_sparse_parametrization"):
        assert lightning_stthree.remove_st3_parametrization is remove_sparse_parametrization
    with pytest.raises(AttributeError, match=r"^module 'lightning_stthree' has no attribute 'ST3PrunningCallback'$"):
        _ = lightning_stthree.ST3PrunningCallback
    assert len(lightning_stthree.__all__) <= 25
    added_since = {"remove_sparse_parametrization", "ActivationSparsityCallback"}  # names 0.1 did not have
    assert set(lightning_stthree.__all__) <= set(PUBLIC_NAMES["lightning_stthree"]) | added_since
    _moved._warned.discard("lightning_stthree.num_pruned")
    with pytest.warns(FutureWarning, match="`lightning_stthree.num_pruned` moved") as seen:
        _ = lightning_stthree.num_pruned
    assert seen[0].filename == __file__


def _stored_effective_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The effective weights 0.1 computed and saved under the plain ``weight`` keys of its checkpoint."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    raw = ".parametrizations.weight.original"
    return {key[: -len(raw)] + ".weight": state[key[: -len(raw)] + ".weight"] for key in state if key.endswith(raw)}


# `stthree validate` of each fixture with its YAML, run by 0.1.0 itself (commit d6382b8). Twelve steps of training
# at high sparsity leave these networks near chance: what matters is that the numbers are the same.
VALIDATE_BY_0_1 = {
    "st3_digits": {"val_loss": 2.3213324546813965, "val_acc": 0.07037036865949631},
    "str_digits": {"val_loss": 2.302178144454956, "val_acc": 0.10370370000600815},
}


@pytest.mark.usefixtures("fresh_aliases")
@pytest.mark.parametrize(("name", "method"), [("st3_digits", ST3PruningCallback), ("str_digits", STRPruningCallback)])
def test_an_old_checkpoint_and_its_old_yaml_validate_with_the_same_effective_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, method: type
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint = FIXTURES / f"{name}.ckpt"
    with pytest.warns(FutureWarning, match="in lightning-stthree 0.2"):
        cli = main(["validate", "--config", str(FIXTURES / f"{name}.yaml"), "--ckpt_path", str(checkpoint)])
    assert any(isinstance(cb, method) for cb in cli.trainer.callbacks)
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert metrics == pytest.approx(VALIDATE_BY_0_1[name], rel=1e-5)
    # The layers came in plain and leave plain, holding the effective weights the new code computed from 0.1's raw
    # weights and thresholds: exactly the ones 0.1 computed and stored.
    weights = {f"model.{key}": value for key, value in cli.model.model.state_dict().items()}
    stored = _stored_effective_weights(checkpoint)
    assert len(stored) == 4
    for key, expected in stored.items():
        assert torch.equal(weights[key] == 0, expected == 0), key  # the same weights pruned
        torch.testing.assert_close(weights[key], expected, rtol=1e-6, atol=1e-7, msg=key)
    assert sum(int((w == 0).sum()) for w in stored.values()) > 0.5 * sum(w.numel() for w in stored.values())


@pytest.mark.usefixtures("fresh_aliases")
def test_an_old_checkpoint_resumes_training_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(FIXTURES / "st3_digits.yaml"), "--ckpt_path", str(FIXTURES / "st3_digits.ckpt")]
    with pytest.warns(FutureWarning, match="in lightning-stthree 0.2"):
        cli = main([*args, "--trainer.max_steps", "16"])
    (callback,) = (cb for cb in cli.trainer.callbacks if isinstance(cb, ST3PruningCallback))
    state = torch.load(FIXTURES / "st3_digits.ckpt", weights_only=True)
    assert state["global_step"] == 12
    # Lightning restores a callback's state under its state key: 0.1's key is the callback's key now.
    assert callback.state_key in state["callbacks"]
    assert state["callbacks"][callback.state_key]["last_update_step"] == 12
    assert cli.trainer.global_step == 16  # 4 more steps, not 16 from scratch
    assert callback.last_update_step == 16
    assert callback.sparsity == 0.8  # past the ramp's end (step 8): the target
    sparsity, _ = callback.measure_sparsity()
    assert sparsity == pytest.approx(0.8, abs=0.002)


def test_a_pickled_sparse_inference_model_of_0_1_loads_and_gives_its_outputs() -> None:
    saved = torch.load(FIXTURES / "sparse_inference_module.pt", weights_only=False)
    from lightning_stthree.inference import SparseLinear

    model = saved["model"]
    assert [type(m) for m in model if not isinstance(m, torch.nn.ReLU)] == [SparseLinear, SparseLinear]
    with torch.inference_mode():
        torch.testing.assert_close(model(saved["input"]), saved["output"])


@pytest.mark.usefixtures("fresh_aliases")
def test_a_pickled_0_1_network_naming_a_moved_module_loads() -> None:
    from lightning_stthree.recipes.models import SmallCNN

    with pytest.warns(FutureWarning, match="`lightning_stthree.models` moved"):
        saved = torch.load(FIXTURES / "small_cnn_module.pt", weights_only=False)
    assert type(saved["model"]) is SmallCNN
    with torch.no_grad():
        torch.testing.assert_close(saved["model"](saved["input"]), saved["output"])
