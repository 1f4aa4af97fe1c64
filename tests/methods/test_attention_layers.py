"""nn.MultiheadAttention's packed `in_proj_weight` is pruned with the rest, in torchvision's ViT and Swin too."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers import ImageClassifier, TinyNet, quiet_trainer, random_loader
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models import SwinTransformer, VisionTransformer

from lightning_stthree import (
    ST3PruningCallback,
    STRPruningCallback,
    make_permanent,
    register_st3_parametrization,
    sparse_state_dict,
)
from lightning_stthree.core.layers import pruned_tensor


def _small_vit() -> VisionTransformer:
    # torchvision's ViT class (as in vit_b_16), small: 32x32 images in 8x8 patches (16 + 1 tokens), 2 blocks.
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)  # fmt: skip


def _small_swin() -> SwinTransformer:
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10)  # fmt: skip


def _fit(network: nn.Module, callback: object, steps: int = 6) -> ImageClassifier:
    torch.manual_seed(0)
    module = ImageClassifier(network, lr=0.05)
    quiet_trainer(max_steps=steps, callbacks=[callback]).fit(module, random_loader(steps, shape=(3, 32, 32)))
    return module


def _zeros_and_total(callback: ST3PruningCallback) -> tuple[int, int]:
    """Zeros of the effective pruned tensors, counted with numpy (independently of the callback's measurement)."""
    arrays = [pruned_tensor(m).detach().numpy() for m in callback.layers.values()]
    return sum(int((a == 0).sum()) for a in arrays), sum(a.size for a in arrays)


def test_vit_in_proj_weights_are_pruned_counted_and_used_by_the_forward() -> None:
    torch.manual_seed(0)
    vit = _small_vit()
    plain = copy.deepcopy(vit)
    callback = ST3PruningCallback(0.8, start=0, end=4, input_shape=[1, 3, 32, 32], report=False)
    module = _fit(vit, callback)
    attention = [f"model.encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert set(attention) < set(callback.layers)
    for name in attention:
        layer = module.get_submodule(name)
        assert parametrize.is_parametrized(layer, "in_proj_weight")
        assert f"{name}.out_proj" in callback.layers
    # The packed q/k/v weights (2 x 3,072 of the 22,848 pruned weights) are in the global pool and pruned with it.
    zeros, total = _zeros_and_total(callback)
    assert total == sum(p.numel() for n, p in plain.named_parameters() if n.endswith("weight") and p.ndim > 1)
    assert total == 22_848
    assert zeros / total == pytest.approx(callback.measure_sparsity()[0], abs=1e-12)
    assert callback.measure_sparsity()[0] == pytest.approx(0.8, abs=0.002)
    in_proj = module.get_submodule(attention[0]).in_proj_weight.detach()
    assert 0.3 < float((in_proj == 0).float().mean()) < 1.0
    # MACs of the packed projection per image: 17 tokens x (3 x 32) x 32.
    assert callback._layer_macs[attention[0]] == 17 * 3 * 32 * 32
    # A plain torchvision ViT holding the effective weights (loaded from the state dict's plain keys) computes the same
    # outputs, in train mode and in eval mode (where attention takes PyTorch's fused fast path).
    plain.load_state_dict(sparse_state_dict(module.state_dict(), prefix="model."))
    x = torch.randn(4, 3, 32, 32)
    for train in (True, False):
        vit.train(train)
        plain.train(train)
        with torch.no_grad():
            torch.testing.assert_close(vit(x), plain(x), rtol=1e-5, atol=1e-5)


def test_swin_attention_weights_are_linear_layers_and_all_pruned() -> None:
    torch.manual_seed(0)
    swin = _small_swin()
    callback = ST3PruningCallback(0.8, start=0, end=4, report=False)
    _fit(swin, callback)
    attention = [name for name in callback.layers if name.endswith((".attn.qkv", ".attn.proj"))]
    assert len(attention) == 2 * 4  # qkv and proj of each of the 4 blocks
    zeros, total = _zeros_and_total(callback)
    assert zeros / total == pytest.approx(0.8, abs=0.002)
    permanent = make_permanent(copy.deepcopy(swin)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(swin.eval()(x), permanent(x), rtol=1e-5, atol=1e-5)


def test_dense_pretrained_attention_weights_load_into_the_parametrized_model() -> None:
    torch.manual_seed(0)
    pretrained = _small_vit()
    vit = _small_vit()
    callback = ST3PruningCallback(0.8, start=0, end=4, report=False)
    _fit(vit, callback, steps=2)
    vit.load_state_dict(pretrained.state_dict())  # plain keys: become the raw weights, thresholds 0
    layer = vit.encoder.layers.encoder_layer_0.self_attention
    assert float(layer.parametrizations.in_proj_weight[0].threshold) == 0.0
    expected = pretrained.encoder.layers.encoder_layer_0.self_attention.in_proj_weight
    torch.testing.assert_close(layer.in_proj_weight, expected)


def test_str_prunes_attention_too() -> None:
    callback = STRPruningCallback(s_init=-2.0, report=False)
    module = _fit(_small_vit(), callback, steps=2)
    layer = module.model.encoder.layers.encoder_layer_0.self_attention
    assert parametrize.is_parametrized(layer, "in_proj_weight")
    threshold = torch.sigmoid(layer.parametrizations.in_proj_weight[0].s).item()
    raw = layer.parametrizations.in_proj_weight.original.detach().numpy()
    assert np.array_equal(layer.in_proj_weight.detach().numpy() == 0, np.abs(raw) <= np.float32(threshold))


def test_attention_with_separate_key_value_widths_is_reported() -> None:
    class CrossNet(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(10, 2, kdim=4, vdim=4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = super().forward(x).unsqueeze(1)
            return self.attn(logits, logits[..., :4], logits[..., :4])[0].squeeze(1)

    callback = ST3PruningCallback(0.5, start=0, end=2, report=False)
    with pytest.warns(UserWarning, match=r"\['attn'\] have `kdim`/`vdim` other than `embed_dim`.*not pruned"):
        quiet_trainer(max_steps=3, callbacks=[callback]).fit(CrossNet(), random_loader(3))
    assert "attn" not in callback.layers
    assert "attn.out_proj" in callback.layers


def _parametrized_attention(threshold: float) -> tuple[nn.MultiheadAttention, list[int]]:
    """A parametrized attention layer at ``threshold`` and a list counting its effective-weight computations."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    parametrization = register_st3_parametrization(attention)
    parametrization.threshold.fill_(threshold)
    computed = [0]
    parametrization.register_forward_hook(lambda *_: computed.__setitem__(0, computed[0] + 1))
    return attention, computed


def _plain_attention_holding(attention: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """A plain attention layer whose ``in_proj_weight`` is a leaf holding ``attention``'s effective weight."""
    plain = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        plain.in_proj_weight.copy_(attention.in_proj_weight)
        plain.in_proj_bias.copy_(attention.in_proj_bias)
        plain.out_proj.load_state_dict(attention.out_proj.state_dict())
    return plain


def _assert_cache_closed() -> None:
    """torch's parametrization cache is off and empty: the hooks closed it when the call ended."""
    assert not parametrize._cache_enabled
    assert not parametrize._cache


def test_attention_builds_its_effective_weight_once_per_call() -> None:
    # Unhooked, nn.MultiheadAttention.forward reads `in_proj_weight` 3 times in train mode and 4 or 5 in eval mode
    # (its fast path's checks), each read computing the effective weight again.
    attention, computed = _parametrized_attention(0.1)
    x = torch.randn(3, 5, 16)
    for train, grad in ((True, True), (False, True), (False, False)):
        attention.train(train)
        plain = _plain_attention_holding(attention).train(train)
        computed[0] = 0
        with torch.set_grad_enabled(grad):
            got, want = attention(x, x, x)[0], plain(x, x, x)[0]
        assert computed[0] == 1, (train, grad)
        torch.testing.assert_close(got, want)
        _assert_cache_closed()
        if grad:
            # The straight-through gradient reaches the raw weight: equal to the plain layer's weight gradient.
            got.square().sum().backward()
            want.square().sum().backward()
            raw = attention.parametrizations.in_proj_weight.original
            torch.testing.assert_close(raw.grad, plain.in_proj_weight.grad)
            raw.grad = None


def test_attention_cache_is_dropped_between_calls_and_when_a_call_fails() -> None:
    attention, computed = _parametrized_attention(0.1)
    x = torch.randn(3, 5, 16)
    attention(x, x, x)
    attention.parametrizations.in_proj_weight[0].threshold.fill_(0.2)  # a new threshold: the next call sees it
    plain = _plain_attention_holding(attention)
    computed[0] = 0
    torch.testing.assert_close(attention(x, x, x)[0], plain(x, x, x)[0])
    assert computed[0] == 1
    with pytest.raises(AssertionError, match="embedding dimension"):
        attention(torch.randn(3, 5, 7), x, x)  # a wrong width raises inside the call
    _assert_cache_closed()


def test_attention_hooks_compile_trace_and_leave_with_make_permanent() -> None:
    attention, _ = _parametrized_attention(0.1)
    x = torch.randn(3, 5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)  # raises on a graph break
    torch.testing.assert_close(compiled(x, x, x)[0], attention(x, x, x)[0])
    _assert_cache_closed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, and still used to export
        traced = torch.jit.trace(attention, (x, x, x), check_trace=False)  # torch's cache would refuse tracing
    torch.testing.assert_close(traced(x, x, x)[0], attention(x, x, x)[0])
    make_permanent(attention)
    assert not attention._forward_pre_hooks
    assert not attention._forward_hooks
    assert not attention._forward_hooks_always_called
    restored = pickle.loads(pickle.dumps(attention))
    torch.testing.assert_close(restored(x, x, x)[0], attention(x, x, x)[0])
