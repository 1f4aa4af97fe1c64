"""The models people bring, nobody here wrote them: Hugging Face GPT-2, LLaMA and BERT, and timm, built from their
config classes (random init, nothing downloaded). Judged by the weights the matrix products and convolutions really
receive (a TorchDispatchMode over one forward pass), not by the parametrization's own output."""

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_stthree import ST3PruningCallback, effective_weight, sparsity_report
from lightning_stthree.core import registry
from lightning_stthree.core.layers import layer_type
from lightning_stthree.methods.measure import received_sparsity
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.methods.st3 import find_st3_parametrization

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
transformers.logging.set_verbosity_error()

VOCAB, TOKENS = 128, 16


@pytest.fixture(autouse=True)
def registry_as_built_in() -> Iterator[None]:
    """Tests that register types must not leak them into other tests."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


class CausalLM(pl.LightningModule):
    """Any Hugging Face causal LM, trained on next-token prediction of random tokens."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = {"input_ids": torch.zeros(1, TOKENS, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _token_loader(steps: int) -> DataLoader:
    ids = torch.randint(0, VOCAB, (steps * 2, TOKENS), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=2)


def _fit_lm(model: torch.nn.Module, steps: int = 6, **kwargs: Any) -> tuple[CausalLM, ST3PruningCallback]:
    torch.manual_seed(0)
    module = CausalLM(model)
    callback = ST3PruningCallback(0.8, start=0, end=4, report=False, **kwargs)
    quiet_trainer(max_steps=steps, callbacks=[callback]).fit(module, _token_loader(steps))
    return module, callback


def _block_zeros(module: pl.LightningModule, callback: ST3PruningCallback) -> dict[str, float | None]:
    received = received_sparsity(module, module.example_input_array, callback.layers)
    return {name: value for name, value in received.items() if "lm_head" not in name}


def test_gpt2_conv1d_layers_reach_the_target_in_what_the_ops_receive_and_the_tied_lm_head_stays_one_matrix() -> None:
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=TOKENS)
    with pytest.warns(UserWarning, match=r"leaves \['model.lm_head'\] dense.*model.transformer.wte"):
        module, callback = _fit_lm(transformers.GPT2LMHeadModel(config))
    gpt2 = module.model
    assert {layer_type(layer).__name__ for layer in callback.layers.values()} == {"Conv1D"}
    assert len(callback.layers) == 8  # c_attn, c_proj, c_fc, c_proj in each of the 2 blocks
    zeros = _block_zeros(module, callback)
    assert min(zeros.values()) > 0.5
    total = sum(zeros[n] * layer.weight.numel() for n, layer in callback.layers.items())
    assert total / sum(layer.weight.numel() for layer in callback.layers.values()) >= 0.7
    # One parameter, one matrix: the output projection and the embedding lookup use the same dense tensor.
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert "model.lm_head" not in callback.layers
    row = next(r for r in sparsity_report(module) if r["name"] == "model.lm_head")
    assert row["pruned"] is False


@pytest.mark.parametrize("shrinkage", ["firm", "half"])
def test_gpt2_conv1d_layers_with_an_l0_like_shrinkage_receive_the_zeros_and_the_shrunk_weights(shrinkage: str) -> None:
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=TOKENS)
    with pytest.warns(UserWarning, match="leaves"):  # the tied lm_head stays dense
        module, callback = _fit_lm(transformers.GPT2LMHeadModel(config), shrinkage=shrinkage)
    # The matrix products receive exactly the zeros the callback counts, at the target.
    assert _block_zeros(module, callback) == pytest.approx(callback.measure_sparsity()[1], abs=1e-12)
    assert callback.measure_sparsity()[0] == pytest.approx(0.8, abs=1e-3)
    attention = module.model.transformer.h[0].attn.c_attn  # weight (in, out): output channels on dim 1
    parametrization = find_st3_parametrization(attention)
    assert (parametrization.out_dim, parametrization.shrinkage) == (1, shrinkage)
    raw = raw_weight(attention).detach()
    expected = effective_weight(raw.t(), parametrization.threshold, shrinkage=shrinkage).t()
    torch.testing.assert_close(attention.weight.detach(), expected, rtol=1e-6, atol=1e-7)


class _EmbeddingTables(TorchDispatchMode):
    """Records the table of every embedding lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[torch.Tensor] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.embedding.default:
            self.tables.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def test_prune_tied_prunes_the_lm_head_for_the_embedding_lookup_too_one_matrix_for_both() -> None:
    from lightning_stthree import make_permanent, sparse_state_dict

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=TOKENS)
    torch.manual_seed(0)
    module = CausalLM(transformers.GPT2LMHeadModel(config))
    callback = ST3PruningCallback(0.8, start=0, end=4, report=False, prune_tied=True)
    quiet_trainer(max_steps=6, callbacks=[callback]).fit(module, _token_loader(6))
    gpt2 = module.model
    assert "model.lm_head" in callback.layers
    assert callback._tied == {"model.lm_head": ["model.transformer.wte"]}
    effective = gpt2.lm_head.weight.detach()
    zeros = float((effective == 0).float().mean())
    assert zeros > 0.5
    ids = torch.arange(TOKENS).unsqueeze(0)
    module.eval()  # no dropout: the outputs are compared below
    with torch.no_grad(), _EmbeddingTables() as recorded:
        logits = module(ids)
    wte = [t for t in recorded.tables if t.shape == effective.shape]
    assert len(wte) == 1
    assert torch.equal(wte[0], effective)  # the lookup reads the pruned matrix
    received = received_sparsity(module, {"input_ids": ids}, {"model.lm_head": gpt2.lm_head})
    assert received["model.lm_head"] == pytest.approx(zeros)  # and so does the output projection
    # A plain GPT-2 (tied) loads the sparse weights and computes the same; make_permanent keeps one parameter.
    plain = transformers.GPT2LMHeadModel(config).eval()
    plain.load_state_dict(sparse_state_dict(module.state_dict(), "model."))
    assert plain.lm_head.weight is plain.transformer.wte.weight
    torch.testing.assert_close(plain(input_ids=ids).logits, logits)
    module.load_state_dict(module.state_dict())  # the tied holder's hooks take its own state dict back
    make_permanent(module)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert torch.equal(gpt2.lm_head.weight, effective)
    assert type(gpt2.transformer.wte) is torch.nn.Embedding
    torch.testing.assert_close(module(ids), logits)


def test_conv1d_is_rescaled_per_output_channel_like_the_linear_it_transposes() -> None:
    from lightning_stthree import register_st3_parametrization

    torch.manual_seed(0)
    conv1d = transformers.pytorch_utils.Conv1D(6, 5)  # weight (in=5, out=6)
    linear = torch.nn.Linear(5, 6)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    for layer in (conv1d, linear):
        register_st3_parametrization(layer).threshold.fill_(0.015)
    assert conv1d.parametrizations.weight[0].out_dim == 1
    torch.testing.assert_close(conv1d.weight, linear.weight.T)
    x = torch.randn(3, 5)
    torch.testing.assert_close(conv1d(x), linear(x))


@pytest.mark.parametrize(
    "config",
    [
        lambda: transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TOKENS,
        ),
        lambda: transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENS,
            is_decoder=True,
        ),
    ],
    ids=["llama", "bert"],
)
def test_linear_transformers_reach_the_target_in_what_the_ops_receive(config: Any) -> None:
    model = transformers.AutoModelForCausalLM.from_config(config())
    module, callback = _fit_lm(model)
    zeros = _block_zeros(module, callback)
    assert zeros
    assert None not in zeros.values()
    weights = {n: layer.weight.numel() for n, layer in callback.layers.items() if n in zeros}
    assert sum(zeros[n] * weights[n] for n in zeros) / sum(weights.values()) >= 0.7


class ImageModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _images(steps: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(steps * 4, 3, 32, 32, generator=generator), torch.randint(0, 10, (steps * 4,))),
        batch_size=4,
    )


def test_timm_stdconv2d_which_standardises_its_weight_is_refused_at_setup_naming_it() -> None:
    model = ImageModule(timm.create_model("resnetv2_50x1_bit", num_classes=10, pretrained=False))
    trainer = quiet_trainer(max_steps=1, callbacks=[ST3PruningCallback(0.8, start=0, end=1)])
    with pytest.raises(MisconfigurationException, match=r"StdConv2d.*override the `forward`.*timm.layers.std_conv"):
        trainer.fit(model, _images(1))


def test_the_report_check_flags_a_registered_type_whose_forward_transforms_the_weight() -> None:
    # A user registers StdConv2d as if its forward used the weight as is: the end-of-fit check catches the lie.
    from timm.layers import StdConv2d

    model = ImageModule(timm.create_model("resnetv2_50x1_bit", num_classes=10, pretrained=False))
    callback = ST3PruningCallback(0.8, start=0, end=1, report=False, layer_types={"timm.layers.StdConv2d": {}})
    assert registry.spec_of(StdConv2d) == registry.LayerSpec()
    with pytest.warns(
        UserWarning, match=r"operations of \d+ pruned layers receive fewer zeros than their weights hold"
    ):
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, _images(2))


def test_timm_resnet18_trains_with_its_convolutions_receiving_the_zeros() -> None:
    model = ImageModule(timm.create_model("resnet18", num_classes=10, pretrained=False))
    callback = ST3PruningCallback(0.8, start=0, end=2, report=False)
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(model, _images(3))
    received = received_sparsity(model, model.example_input_array, callback.layers)
    _, measured = callback.measure_sparsity()
    assert all(received[n] == pytest.approx(measured[n], abs=1e-3) for n in callback.layers)
    assert callback.measure_sparsity()[0] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize(
    ("layer_types", "error", "message"),
    [
        ({"timm.layers.NoSuchConv": {}}, ValueError, r"`layer_types` names 'timm.layers.NoSuchConv', which does not"),
        ({"torch.nn.functional.linear": {}}, TypeError, r"names 'torch.nn.functional.linear', which is .*not an nn"),
        ({"torch.nn.Bilinear": {"dim": 0}}, TypeError, r"`layer_types\['torch.nn.Bilinear'\]` must be a mapping with"),
        ({"torch.nn.Bilinear": {"out_dim": -1}}, ValueError, r"`out_dim` must be an int >= 0, got -1"),
        (["torch.nn.Bilinear"], TypeError, r"`layer_types` must be a mapping of import paths"),
    ],
)
def test_a_bad_layer_types_entry_is_an_error_naming_it(layer_types: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ST3PruningCallback(layer_types=layer_types)


def test_a_registered_type_whose_module_lacks_the_tensor_is_not_prunable() -> None:
    class Gate(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    registry.register_layer_type(Gate, tensor="gate_weight")
    model = torch.nn.Sequential(Gate(), torch.nn.Linear(4, 2))
    from lightning_stthree import find_prunable_layers

    assert list(find_prunable_layers(model)) == ["1"]


def test_the_report_on_request_shows_the_zeros_the_ops_receive_next_to_the_stored_ones() -> None:
    from timm.layers import StdConv2d

    from lightning_stthree import register_st3_parametrization

    registry.register_layer_type(StdConv2d)  # wrongly, as a user might: its forward standardises the weight
    model = torch.nn.Sequential(
        StdConv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 32 * 32, 4)
    )  # timm pads "same"
    for layer in (model[0], model[2]):
        register_st3_parametrization(layer).threshold.fill_(0.02)
    with pytest.raises(ValueError, match="`check_received=True` needs an `example_input`"):
        sparsity_report(model, check_received=True)
    rows = {r["name"]: r for r in sparsity_report(model, torch.zeros(1, 3, 32, 32), check_received=True)}
    assert rows["2"]["received_zeros"] == pytest.approx(rows["2"]["zeros"] / rows["2"]["weights"])
    assert rows["0"]["zeros"] > 0
    assert rows["0"]["received_zeros"] == 0.0  # standardised: every stored zero became a non-zero
    assert rows["total"]["received_zeros"] is None


def test_received_zeros_are_read_from_the_weight_operand_even_when_the_input_has_its_size() -> None:
    linear, conv = torch.nn.Linear(8, 4), torch.nn.Conv2d(16, 64, 1)
    attention = torch.nn.MultiheadAttention(8, 2)
    with torch.no_grad():
        for tensor in (linear.weight, conv.weight, attention.in_proj_weight, attention.out_proj.weight):
            tensor.view(-1)[: tensor.numel() // 2] = 0
    assert received_sparsity(linear, torch.randn(4, 8), {"": linear}) == {"": 0.5}  # input (4, 8) = weight's size
    assert received_sparsity(conv, torch.randn(1, 16, 8, 8), {"": conv}) == {"": 0.5}
    # Attention in eval mode under no_grad (its fused fast path turned off) and its functionally called out_proj.
    layers = {"": attention, "out_proj": attention.out_proj}
    assert received_sparsity(attention, (torch.randn(3, 1, 8),) * 3, layers) == {"": 0.5, "out_proj": 0.5}


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "tf_efficientnet_b0"])
def test_timm_subclasses_that_use_the_weight_as_is_are_pruned_without_a_false_warning(name: str) -> None:
    # timm's Linear (mobilenetv3's classifier) and Conv2dSame (tf_efficientnet) override forward but use the weight
    # as is: they are built in, and the end-of-fit check of what the ops receive stays quiet.
    import warnings

    model = ImageModule(timm.create_model(name, num_classes=10, pretrained=False))
    callback = ST3PruningCallback(0.5, start=0, end=1, report=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*receive fewer zeros than their weights hold")
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, _images(2))
    classes = {layer_type(layer).__name__ for layer in callback.layers.values()}
    assert classes >= ({"Linear"} if "mobilenet" in name else {"Conv2dSame"})


def test_one_network_under_two_attribute_names_is_not_a_tied_weight() -> None:
    class Aliased(ImageModule):
        def __init__(self) -> None:
            super().__init__(timm.create_model("resnet18", num_classes=10, pretrained=False))
            self.backbone = self.model  # the same modules, reachable under a second name

    model = Aliased()
    callback = ST3PruningCallback(0.5, start=0, end=1, report=False)
    quiet_trainer(max_steps=1, callbacks=[callback]).fit(model, _images(1))
    assert len(callback.layers) == 21  # every conv and the classifier, once


def test_a_contradicting_registration_of_a_built_in_type_and_an_impossible_out_dim_are_errors() -> None:
    with pytest.raises(ValueError, match=r"Conv1D is built in as LayerSpec\(tensor='weight', out_dim=1\)"):
        ST3PruningCallback(layer_types={"transformers.pytorch_utils.Conv1D": {}})
    callback = ST3PruningCallback(0.5, start=0, end=1, layer_types={"torch.nn.Bilinear": {"out_dim": 5}})
    model = ImageModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)))
    model.model.append(torch.nn.Bilinear(10, 10, 10))
    with pytest.raises(MisconfigurationException, match=r"`model.2` \(Bilinear\) is registered with out_dim=5"):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(model, _images(1))


def _weight_operands(model: ImageModule) -> dict[str, float | None]:
    """Per pruned-or-not layer, the fraction of zeros in the weight its operation receives."""
    from lightning_stthree import find_prunable_layers

    return received_sparsity(model, model.example_input_array, find_prunable_layers(model))


@pytest.mark.parametrize("name", ["regnety_002", "resnetv2_50x1_bit"])
def test_by_default_no_layer_collapses_and_without_the_floor_the_small_initialised_head_does(name: str) -> None:
    # Both heads are initialised with std 0.01, the rest with fan-in scaling: the pure global threshold takes every
    # head weight first. resnetv2's StdConv2d is registered here only to reach its head (its forward standardises its
    # weight, which the end-of-fit check reports).
    import warnings

    layer_types = {"timm.layers.StdConv2d": {}} if "resnetv2" in name else None
    results = {}
    for floor in (None, 0.0):
        torch.manual_seed(0)
        model = ImageModule(timm.create_model(name, num_classes=10, pretrained=False))
        extra = {} if floor is None else {"min_density_ratio": floor}
        callback = ST3PruningCallback(0.8, start=0, end=1, report=False, layer_types=layer_types, **extra)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(receive fewer zeros|every weight of)")
            quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, _images(2))
        received = _weight_operands(model)
        results[floor] = (received, callback.held_layers, callback.measure_sparsity()[0])
    received, held, total = results[None]
    assert held == ["model.head.fc"]
    assert max(received.values()) < 1.0, "some operation receives an all-zero weight by default"
    assert received["model.head.fc"] == pytest.approx(1.0 - 0.05 * 0.2, abs=0.002)  # held at the floor
    assert total == pytest.approx(0.8, abs=1e-4)  # the others pruned a little more: the total is the schedule's
    received, held, total = results[0.0]
    assert held == []
    assert received["model.head.fc"] == 1.0
    assert total == pytest.approx(0.8, abs=1e-4)
