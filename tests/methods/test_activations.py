"""CReLU and CST against their formulas (numpy), the exact per-batch shift, and the module's running estimates."""

import copy
import math

import numpy as np
import pytest
import torch

from lightning_stthree.core.variance_map import prescribed_clip
from lightning_stthree.methods.activations import SparseActivation, activation_shift, crelu, cst

X = np.linspace(-4.0, 4.0, 801)


@pytest.mark.parametrize(("tau", "clip"), [(0.0, math.inf), (1.0, math.inf), (0.5, 1.5), (2.0, 0.25)])
def test_the_activations_equal_their_formulas(tau: float, clip: float) -> None:
    x = torch.tensor(X)
    np.testing.assert_allclose(crelu(x, tau, clip).numpy(), np.minimum(np.maximum(X - tau, 0), clip), atol=1e-15)
    expected = np.sign(X) * np.minimum(np.maximum(np.abs(X) - tau, 0), clip)
    np.testing.assert_allclose(cst(x, tau, clip).numpy(), expected, atol=1e-15)
    assert not torch.signbit(cst(x, tau, clip)[cst(x, tau, clip) == 0]).any()  # exact +0.0 zeros


def test_hand_values_and_gradients() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.5, 2.5, 5.0], requires_grad=True)
    assert crelu(x, 1.0, 2.0).tolist() == [0, 0, 0, 0, 0.5, 1.5, 2.0]
    assert cst(x, 1.0, 2.0).tolist() == [-2.0, 0, 0, 0, 0.5, 1.5, 2.0]
    crelu(x, 1.0, 2.0).sum().backward()  # slope 1 inside (tau, tau + m), 0 in the dead zone and the clipped part
    assert x.grad.tolist() == [0, 0, 0, 0, 1, 1, 0]
    x.grad = None
    cst(x, 1.0, 2.0).sum().backward()
    assert x.grad.tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert torch.equal(crelu(x, 0.0), torch.relu(x))  # tau = 0, no clip: the ReLU


@pytest.mark.parametrize("activation", ["crelu", "cst"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.95])
def test_the_shift_zeroes_exactly_the_scheduled_fraction(activation: str, sparsity: float) -> None:
    pre = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) + 0.2
    tau = activation_shift(pre, sparsity, activation)
    out = (crelu if activation == "crelu" else cst)(pre, tau)
    zeros = int((out == 0).sum())
    if activation == "crelu" and sparsity < float((pre <= 0).float().mean()):
        assert float(tau) == 0.0  # never denser than the ReLU it replaces
        assert zeros == int((pre <= 0).sum())
    else:
        assert zeros == round(sparsity * pre.numel())  # no ties in Gaussian data: exactly k zeros


@pytest.mark.parametrize("activation", ["crelu", "cst"])
def test_the_module_follows_its_target_in_training_and_keeps_running_estimates(activation: str) -> None:
    torch.manual_seed(0)
    layer = SparseActivation(activation, target_sparsity=0.8)
    assert layer.clip == prescribed_clip(activation, 0.8)
    layer.sparsity = 0.8
    for _ in range(50):
        out = layer(torch.randn(32, 256) * 2.0)
        assert float((out == 0).float().mean()) == pytest.approx(0.8, abs=1 / out.numel())
    zeros, elements = layer.take_measured()
    assert elements == 50 * 32 * 256
    assert zeros == pytest.approx(0.8 * elements, abs=50)
    assert float(layer.scale) == pytest.approx(2.0, rel=0.02)  # the root mean square of the pre-activations
    assert out.abs().max() <= layer.clip * float(layer.scale) * 1.2  # clipped at m = clip * rms (batch rms)
    layer.eval()  # evaluation: the running shift, about the Gaussian quantile
    held_out = layer(torch.randn(4096, 256) * 2.0)
    assert float((held_out == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    restored = SparseActivation(activation, target_sparsity=0.8)
    restored.load_state_dict(copy.deepcopy(layer.state_dict()))
    restored.eval()
    x = torch.randn(8, 256)
    assert torch.equal(restored(x), layer(x))
    assert set(layer.state_dict()) == {"tau", "scale", "started"}


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`activation` must be one of \('crelu', 'cst'\), got 'relu'"):
        SparseActivation("relu")
    with pytest.raises(ValueError, match=r"`clip` must be in \(0, inf\], got 0"):
        SparseActivation("crelu", clip=0)
    with pytest.raises(ValueError, match=r"`momentum` must be in \(0, 1\], got 0"):
        SparseActivation("crelu", momentum=0)


@pytest.mark.parametrize("activation", ["crelu", "cst"])
def test_compiled_and_bf16_modules_give_the_eager_float32_zeros(activation: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 128)
    eager = SparseActivation(activation, target_sparsity=0.7)
    eager.sparsity = 0.7
    compiled = copy.deepcopy(eager)
    expected = eager(x)
    got = torch.compile(compiled, backend="eager")(x)  # traced by dynamo; the aot/inductor path is the model's own
    assert torch.equal(got, expected)
    assert torch.equal(compiled.tau, eager.tau)
    half = copy.deepcopy(eager).bfloat16()
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert float((out == 0).float().mean()) == pytest.approx(0.7, abs=0.02)  # bf16 ties at the shift add zeros


def test_a_dense_state_dict_loads_and_the_estimates_start_afresh() -> None:
    dense = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    sparse = copy.deepcopy(dense)
    sparse[1] = SparseActivation("crelu", target_sparsity=0.5)
    sparse[1].started.fill_(True)
    sparse.load_state_dict(dense.state_dict())  # strict: the activation's missing buffers are not an error
    assert not bool(sparse[1].started)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # other mismatches still are
        sparse.load_state_dict({**dense.state_dict(), "1.extra": torch.zeros(())})
