"""Sparse inference: CSR layers equal dense ones, the conversion chooses by timing, the result saves and loads."""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer

from lightning_stthree import (
    make_permanent,
    register_st3_parametrization,
    restore_sparse_inference,
    to_sparse_inference,
)
from lightning_stthree.inference import (
    SparseConv2d,
    SparseLinear,
    SparseMultiheadAttention,
    conv_weight_to_csr,
    dense_to_csr,
)
from lightning_stthree.inference import modules as sparse_modules


def _sparsify(model: nn.Module, sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    """Zero a random ``sparsity`` share of every Linear/Conv2d weight (an independent stand-in for a trained model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(torch.rand(module.weight.shape, generator=generator) >= sparsity)
    return model


def _csr_to_numpy(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    dense = np.zeros(shape, dtype=values.numpy().dtype)
    crow_np, col_np, values_np = crow.numpy(), col.numpy(), values.numpy()
    for row in range(shape[0]):
        for entry in range(crow_np[row], crow_np[row + 1]):
            dense[row, col_np[entry]] = values_np[entry]
    return dense


def _modules_of(model: nn.Module, kind: type) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, kind)]


def test_dense_to_csr_stores_exactly_the_nonzeros() -> None:
    matrix = torch.tensor([[0.0, 1.5, 0.0, -0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -3.0, 4.0]])
    crow, col, values = dense_to_csr(matrix)
    rows, cols = np.nonzero(matrix.numpy())
    assert crow.tolist() == [0, 1, 1, 4]
    assert col.tolist() == cols.tolist()
    assert values.tolist() == matrix.numpy()[rows, cols].tolist() == [1.5, 2.0, -3.0, 4.0]
    with pytest.raises(ValueError, match=r"`matrix` must be 2-D, got shape \(4,\)"):
        dense_to_csr(torch.ones(4))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_weight_to_csr_is_the_block_diagonal_unfold_matrix(groups: int) -> None:
    out_channels, in_channels, kh, kw = 8, 4, 3, 2
    weight = _sparsify(nn.Conv2d(in_channels, out_channels, (kh, kw), groups=groups), 0.5).weight.detach()
    matrix = _csr_to_numpy(*conv_weight_to_csr(weight, groups), (out_channels, in_channels * kh * kw))
    # By hand: output channel o of group g sees input channels g * (in / groups) ... in unfold's (c, i, j) order.
    expected = np.zeros_like(matrix)
    per_out, per_in = out_channels // groups, in_channels // groups
    for o in range(out_channels):
        g = o // per_out
        for c in range(per_in):
            for i in range(kh):
                for j in range(kw):
                    expected[o, ((g * per_in + c) * kh + i) * kw + j] = weight[o, c, i, j]
    np.testing.assert_array_equal(matrix, expected)
    with pytest.raises(ValueError, match="`groups` must be a positive divisor of out_channels=8, got 3"):
        conv_weight_to_csr(weight, 3)


@pytest.mark.parametrize("shape", [(16,), (1, 16), (5, 16), (2, 3, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    linear = _sparsify(nn.Linear(16, 12, bias=bias))
    sparse = SparseLinear.from_dense(linear)
    x = torch.randn(shape)
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-6)
    assert sparse(x).shape == (*shape[:-1], 12)
    torch.testing.assert_close(sparse.weight, linear.weight, rtol=0, atol=0)
    assert sparse.nnz == int(torch.count_nonzero(linear.weight))
    assert [name for name, _ in sparse.named_parameters()] == []  # inference only: nothing to train
    assert sparse.crow_indices.dtype == sparse.col_indices.dtype == torch.int64


CONV_CONFIGS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2},
    {"kernel_size": 3, "dilation": 2, "padding": 2},
    {"kernel_size": 1, "stride": 2},
    {"kernel_size": 1},
    {"kernel_size": (3, 1), "padding": (1, 0), "stride": (1, 2)},
    {"kernel_size": 3, "groups": 2, "padding": 1},
    {"kernel_size": 3, "groups": 4, "padding": 1},  # depthwise: in_channels == groups
    {"kernel_size": 4, "padding": "same"},  # even kernel: asymmetric padding
    {"kernel_size": 3, "padding": "valid"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 2, "padding_mode": "circular"},
    {"kernel_size": 3, "padding": 1, "bias": False},
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # the dense reference's
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("input_shape", [(2, 4, 9, 7), (4, 8, 8)])
def test_sparse_conv2d_equals_conv2d(config: dict, input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    conv = _sparsify(nn.Conv2d(4, 8, **config))
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(input_shape)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-6)
    assert sparse(x).is_contiguous()
    torch.testing.assert_close(sparse.weight, conv.weight, rtol=0, atol=0)


def test_resnet18_converted_layer_by_layer_equals_the_dense_model() -> None:
    torch.manual_seed(0)
    model = _sparsify(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    sparse_model, report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    # min_speedup=0 converts every layer with a sparse kernel: all 20 convolutions and the classifier.
    assert len(report.converted) == 21 == len(_modules_of(model, (nn.Conv2d, nn.Linear)))
    assert _modules_of(sparse_model, (nn.Conv2d, nn.Linear)) == []
    assert isinstance(sparse_model.fc, SparseLinear)
    assert isinstance(sparse_model.layer2[0].downsample[0], SparseConv2d)
    assert isinstance(model.fc, nn.Linear)  # the input model is left alone
    with torch.inference_mode():
        torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-4, atol=1e-5)
        other = torch.randn(5, 3, 40, 40)  # another batch size and resolution than the example
        torch.testing.assert_close(sparse_model(other), model(other), rtol=1e-4, atol=1e-5)
    for choice in report.layers:
        assert choice.dense_ms > 0
        assert choice.sparse_ms > 0
        assert choice.density == pytest.approx(
            float(torch.count_nonzero(model.get_submodule(choice.name).weight)) / math.prod(choice.shape)
        )
    assert report.dense_ms > 0
    assert report.sparse_ms > 0


def test_mobilenet_depthwise_convolutions_convert() -> None:
    torch.manual_seed(0)
    model = _sparsify(torchvision.models.mobilenet_v3_small(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    sparse_model, report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    depthwise = [c for c in report.layers if c.layer_type == "Conv2d" and c.shape[1] == 1]
    assert depthwise
    assert all(c.converted for c in depthwise)
    torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-4, atol=1e-5)


def test_an_st3_parametrized_model_converts_to_its_effective_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    for layer in (model[0], model[2]):
        register_st3_parametrization(layer).threshold.fill_(0.1)
    x = torch.randn(4, 32)
    sparse_model, report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    assert report.converted == ["0", "2"]
    torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-5, atol=1e-6)
    permanent = make_permanent(copy.deepcopy(model))
    torch.testing.assert_close(sparse_model[0].weight, permanent[0].weight, rtol=0, atol=0)
    assert hasattr(model[0], "parametrizations")  # the parametrized input model still trains as before


def test_transformer_encoder_converts_and_leaves_the_fused_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = _sparsify(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)).eval()
    x = torch.randn(3, 7, 32)
    sparse_model, report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    assert len(report.converted) == 8  # per block: self_attn, its out_proj, linear1, linear2
    assert isinstance(sparse_model.layers[1].self_attn, SparseMultiheadAttention)
    assert {c.reason for c in report.layers if c.name.endswith("out_proj")} == {"in its sparse attention"}
    # The dense model takes PyTorch's fused encoder fast path in eval mode; the converted one must not (that path
    # reads the weights as dense tensors), and still gives the same outputs.
    calls = []
    original = sparse_modules.csr_linear  # patched where the layers look it up
    monkeypatch.setattr(sparse_modules, "csr_linear", lambda *args: calls.append(1) or original(*args))
    with torch.inference_mode():
        torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-4, atol=1e-5)
        assert len(calls) == 8  # every converted layer ran its sparse kernel
        mask = torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 6 + [True]])
        causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
        torch.testing.assert_close(
            sparse_model(x, mask=causal, src_key_padding_mask=mask, is_causal=True),
            model(x, mask=causal, src_key_padding_mask=mask, is_causal=True),
            rtol=1e-4,
            atol=1e-5,
        )


ATTENTION_CALLS = {
    "self": {},
    "weights per head": {"average_attn_weights": False},
    "no weights": {"need_weights": False},
    "bool causal mask": {"attn_mask": torch.ones(5, 5, dtype=torch.bool).triu(1), "need_weights": False},
    "float mask, weights": {"attn_mask": torch.randn(5, 5)},
    "per-head mask": {"attn_mask": torch.randn(2 * 4, 5, 5), "need_weights": False},
    "padding mask": {"key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])},
    "float padding mask": {"key_padding_mask": torch.tensor([[0.0] * 5, [0.0, -1.0, 0.0, 0.5, -9.0]])},
    "causal hint": {"attn_mask": torch.ones(5, 5, dtype=torch.bool).triu(1), "is_causal": True, "need_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kwargs", ATTENTION_CALLS.values(), ids=ATTENTION_CALLS.keys())
def test_sparse_attention_equals_multihead_attention(batch_first: bool, kwargs: dict) -> None:
    torch.manual_seed(0)
    attention = _sparsify(nn.MultiheadAttention(16, 4, batch_first=batch_first)).eval()
    with torch.no_grad():
        attention.in_proj_weight.mul_(torch.rand(attention.in_proj_weight.shape) > 0.8)
    sparse = SparseMultiheadAttention.from_dense(attention).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    expected, expected_weights = attention(x, x, x, **kwargs)
    output, weights = sparse(x, x, x, **kwargs)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    # Cross-attention (other key/value sequences, 3 source tokens) and an unbatched sequence.
    memory = torch.randn(2, 3, 16) if batch_first else torch.randn(3, 2, 16)
    for a, b in zip(attention(x, memory, memory), sparse(x, memory, memory), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    single = x[0] if batch_first else x[:, 0]
    for a, b in zip(attention(single, single, single), sparse(single, single, single), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.in_proj_weight, attention.in_proj_weight, rtol=0, atol=0)


def test_attention_that_cannot_convert_says_why() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.biased = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.biased(x, x, x)[0] + self.cross(x, memory, memory)[0]

    model = Model().eval()
    example = (torch.randn(2, 3, 8), torch.randn(2, 4, 4))
    _, report = to_sparse_inference(model, example, min_speedup=0, repeats=1)
    assert {c.name: c.reason for c in report.layers} == {
        "biased": "add_bias_kv/add_zero_attn are not supported",
        "biased.out_proj": "its nn.MultiheadAttention stays dense",
        "cross.out_proj": "its nn.MultiheadAttention stays dense",  # no in_proj_weight: not a prunable attention
    }


def test_vit_mlp_and_patch_embedding_convert() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)  # fmt: skip
    model = _sparsify(vit).eval()
    x = torch.randn(2, 3, 32, 32)
    sparse_model, report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    assert "conv_proj" in report.converted
    assert "encoder.layers.encoder_layer_0.mlp.0" in report.converted
    with torch.inference_mode():
        torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_choice_follows_the_timings() -> None:
    torch.manual_seed(0)
    model = _sparsify(nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)), 0.98)
    x = torch.randn(8, 512)
    _, report = to_sparse_inference(model, x, min_speedup=1.0, repeats=3)
    for choice in report.layers:
        assert choice.converted == (choice.dense_ms >= choice.sparse_ms)
        assert choice.reason == (">= x1 faster" if choice.converted else "< x1 faster")
    never, report = to_sparse_inference(model, x, min_speedup=math.inf, repeats=1)
    assert report.converted == []
    assert all(c.reason == "< xinf faster" for c in report.layers)
    assert torch.equal(never(x), model(x))  # nothing replaced: bitwise the dense model


def test_layers_without_a_sparse_kernel_or_input_are_reported() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1d = nn.Conv1d(2, 4, 3)
            self.head = nn.Linear(4 * 6, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv1d(x).flatten(1))

    model = Model()
    x = torch.randn(2, 2, 8)
    sparse_model, report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    reasons = {c.name: (c.converted, c.reason) for c in report.layers}
    assert reasons == {
        "conv1d": (False, "no sparse kernel for Conv1d"),
        "head": (True, ">= x0 faster"),
        "unused": (False, "not called by the example input"),
    }
    text = str(report)
    assert "dense (no sparse kernel for Conv1d)" in text
    assert text.splitlines()[-1].startswith("model")
    torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-5, atol=1e-6)


def test_half_precision_on_cpu_keeps_dense_layers_with_the_reason() -> None:
    model = _sparsify(nn.Sequential(nn.Linear(16, 16))).to(torch.bfloat16)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    _, report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    (choice,) = report.layers
    assert not choice.converted
    assert choice.reason.startswith("no sparse kernel here:")
    assert "BFloat16" in choice.reason


def test_saves_and_loads_weights_only(tmp_path: object) -> None:
    torch.manual_seed(0)
    model = _sparsify(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    sparse_model, _report = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    expected = sparse_model(x)
    buffer = io.BytesIO()
    torch.save(sparse_model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = restore_sparse_inference(torchvision.models.resnet18(num_classes=10), state)
    assert _modules_of(restored, (nn.Conv2d, nn.Linear)) == []
    assert torch.equal(restored(x), expected)
    # The whole module pickles too (weights_only=False: the classes are this package's and torchvision's).
    buffer = io.BytesIO()
    torch.save(sparse_model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
    assert torch.equal(copy.deepcopy(sparse_model)(x), expected)
    # A converted model loads the state dict of another conversion with other numbers of stored weights.
    other, _ = to_sparse_inference(_sparsify(model, 0.5, seed=1), x, min_speedup=0, repeats=1)
    sparse_model.load_state_dict(other.state_dict())
    assert torch.equal(sparse_model(x), other(x))
    with pytest.raises(KeyError, match=r"sparse layer `conv1`, but the model has no such module"):
        restore_sparse_inference(nn.Sequential(), state)


def test_a_converted_transformer_restores_from_its_state_dict() -> None:
    def build() -> nn.Module:
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    torch.manual_seed(0)
    sparse_model, _ = to_sparse_inference(_sparsify(build()), torch.randn(2, 5, 16), min_speedup=0, repeats=1)
    buffer = io.BytesIO()
    torch.save(sparse_model.state_dict(), buffer)
    buffer.seek(0)
    restored = restore_sparse_inference(build(), torch.load(buffer, weights_only=True))
    x = torch.randn(3, 4, 16)
    assert isinstance(restored.layers[0].self_attn.out_proj, SparseLinear)
    assert torch.equal(restored(x), sparse_model(x))


def test_inference_mode_and_dtype_moves() -> None:
    torch.manual_seed(0)
    model = _sparsify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)))
    x = torch.randn(2, 3, 8, 8)
    sparse_model, _ = to_sparse_inference(model, x, min_speedup=0, repeats=1)
    with torch.inference_mode():
        torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-5, atol=1e-6)
    double = copy.deepcopy(sparse_model).double()
    assert double[2].values.dtype == torch.float64
    assert double[2].col_indices.dtype == torch.int64
    torch.testing.assert_close(double(x.double()), model.double()(x.double()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_speedup": -1}, ValueError, r"`min_speedup` must be in \[0, inf\], got -1"),
        ({"min_speedup": "fast"}, TypeError, r"`min_speedup` must be a number in \[0, inf\], got 'fast'"),
        ({"min_speedup": math.nan}, ValueError, r"`min_speedup` must be a number in \[0, inf\], got nan"),
        ({"repeats": 0}, ValueError, r"`repeats` must be an int >= 1 \(timed calls per layer\), got 0"),
        ({"repeats": 2.5}, TypeError, r"`repeats` must be an int >= 1 \(timed calls per layer\), got 2.5"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        to_sparse_inference(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


@pytest.mark.gpu
def test_cuda_conversion_equals_the_dense_model() -> None:
    torch.manual_seed(0)
    model = _sparsify(torchvision.models.resnet18(num_classes=10)).eval().cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    sparse_model, report = to_sparse_inference(model, x, min_speedup=0, repeats=2)
    assert report.device.startswith("cuda")
    assert len(report.converted) == 21
    with torch.inference_mode():
        torch.testing.assert_close(sparse_model(x), model(x), rtol=1e-3, atol=1e-4)
    _, timed = to_sparse_inference(model, x, repeats=5)
    for choice in timed.layers:
        assert choice.converted == (choice.dense_ms >= 1.1 * choice.sparse_ms)


def test_hf_gpt2_conv1d_layers_convert_and_restore() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, transformers.pytorch_utils.Conv1D):
                module.weight.mul_(torch.rand_like(module.weight) > 0.9)  # 90% zeros
    tokens = torch.randint(0, 50, (2, 8))
    sparse, report = to_sparse_inference(model, tokens, min_speedup=0)
    converted = [c.name for c in report.layers if c.converted]
    assert {n for n in converted if "h.0." in n} == {
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert isinstance(sparse.transformer.h[0].mlp.c_fc, SparseLinear)
    torch.testing.assert_close(sparse(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-5)
    restored = restore_sparse_inference(transformers.GPT2LMHeadModel(config), sparse.state_dict())
    torch.testing.assert_close(restored(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-5)
