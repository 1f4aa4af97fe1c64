import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_stthree import SoftThresholdParametrization, channel_rescale, effective_weight
from lightning_stthree.methods.shrinkage import SHRINKAGES
from lightning_stthree.methods.st3 import SparseParametrization, register_sparse_parametrization
from lightning_stthree.methods.str import STRParametrization

W = torch.tensor([[0.5, -0.2, 0.1, -0.05], [0.3, 0.01, -0.4, 0.02]])
T = torch.tensor(0.15)
KEEP = torch.tensor([[True, True, False, False], [True, False, True, False]])


def _hand_scale() -> torch.Tensor:
    # r_c = (mean(|w| * m) + 1e-6) / (mean(|w|) + 1e-6), scale_c = 1.01 / (r_c + 0.01), computed by hand per row.
    r0 = ((0.5 + 0.2) / 4 + 1e-6) / ((0.5 + 0.2 + 0.1 + 0.05) / 4 + 1e-6)
    r1 = ((0.3 + 0.4) / 4 + 1e-6) / ((0.3 + 0.01 + 0.4 + 0.02) / 4 + 1e-6)
    return torch.tensor([[1.01 / (r0 + 0.01)], [1.01 / (r1 + 0.01)]])


def test_soft_threshold_by_hand() -> None:
    expected = torch.tensor([[0.35, -0.05, 0.0, 0.0], [0.15, 0.0, -0.25, 0.0]])
    torch.testing.assert_close(effective_weight(W, T, soft_threshold=True, rescale=False), expected)


def test_hard_threshold_by_hand() -> None:
    expected = torch.tensor([[0.5, -0.2, 0.0, 0.0], [0.3, 0.0, -0.4, 0.0]])
    assert torch.equal(effective_weight(W, T, soft_threshold=False, rescale=False), expected)


def test_rescale_by_hand() -> None:
    scale = _hand_scale()
    torch.testing.assert_close(channel_rescale(W, KEEP), scale)
    soft = torch.tensor([[0.35, -0.05, 0.0, 0.0], [0.15, 0.0, -0.25, 0.0]])
    torch.testing.assert_close(effective_weight(W, T, soft_threshold=True, rescale=True), soft * scale)
    hard = torch.tensor([[0.5, -0.2, 0.0, 0.0], [0.3, 0.0, -0.4, 0.0]])
    torch.testing.assert_close(effective_weight(W, T, soft_threshold=False, rescale=True), hard * scale)
    assert (scale > 1).all()  # pruning removed magnitude, the scale gives some back


def test_rescale_is_per_output_channel_of_a_conv_weight() -> None:
    w = torch.randn(4, 3, 3, 3)
    keep = w.abs() > 0.5
    scale = channel_rescale(w, keep)
    assert scale.shape == (4, 1, 1, 1)
    for c in range(4):
        r = ((w[c].abs() * keep[c]).mean() + 1e-6) / (w[c].abs().mean() + 1e-6)
        torch.testing.assert_close(scale[c].flatten(), (1.01 / (r + 0.01)).reshape(1))


@pytest.mark.parametrize("shrinkage", SHRINKAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_zero_threshold_is_exact_identity(shrinkage: str, dtype: torch.dtype) -> None:
    w = torch.randn(8, 5, 3, dtype=torch.float32).to(dtype)
    w[0, 0, 0] = 0.0
    w[1, 0, 0] = 1e30 if dtype in (torch.float32, torch.float64) else 1e4
    out = effective_weight(w, torch.tensor(0.0), rescale=True, shrinkage=shrinkage)
    assert out.dtype == dtype
    assert torch.equal(out, w)


def test_pruned_entries_are_exactly_zero_at_the_threshold() -> None:
    w = torch.tensor([[0.15, -0.15, 0.1500001, 0.2]])
    out = effective_weight(w, torch.tensor(0.15), soft_threshold=True, rescale=True)
    assert out[0, 0] == 0
    assert out[0, 1] == 0
    assert out[0, 2] != 0
    assert out[0, 3] != 0


@pytest.mark.parametrize("soft_threshold", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_straight_through_gradient_is_the_upstream_gradient(soft_threshold: bool, rescale: bool) -> None:
    weight = W.clone().requires_grad_(True)
    upstream = torch.randn_like(W)
    param = SoftThresholdParametrization(soft_threshold=soft_threshold, straight_through=True, rescale=rescale)
    param.threshold.fill_(0.15)
    out = param(weight)
    torch.testing.assert_close(out, effective_weight(W, T, soft_threshold, rescale))
    (out * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)  # pruned entries included


@pytest.mark.parametrize("soft_threshold", [True, False])
def test_without_straight_through_gradient_flows_through_kept_weights_only(soft_threshold: bool) -> None:
    upstream = torch.randn_like(W)
    for rescale, factor in ((False, torch.ones(2, 1)), (True, _hand_scale())):
        weight = W.clone().requires_grad_(True)
        param = SoftThresholdParametrization(soft_threshold=soft_threshold, straight_through=False, rescale=rescale)
        param.threshold.fill_(0.15)
        (param(weight) * upstream).sum().backward()
        torch.testing.assert_close(weight.grad, upstream * KEEP * factor)


def test_gmp_switches_give_plain_magnitude_masking() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    param = SoftThresholdParametrization(soft_threshold=False, straight_through=False, rescale=False)
    parametrize.register_parametrization(layer, "weight", param)
    param.threshold.fill_(0.15)
    assert torch.equal(layer.weight, W * KEEP)
    x = torch.randn(3, 4)
    layer(x).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.equal(grad == 0, ~KEEP.expand_as(grad))


def test_parametrization_state_and_repr() -> None:
    layer = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(layer, "weight", SoftThresholdParametrization())
    keys = set(layer.state_dict())
    assert keys == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.threshold"}
    assert [n for n, _ in layer.named_parameters()] == ["bias", "parametrizations.weight.original"]
    assert "shrinkage='soft', straight_through=True, rescale=True" in repr(layer)


@pytest.mark.parametrize("soft_threshold", [True, False])
def test_weight_exactly_at_the_threshold_is_pruned_and_gets_no_gradient_without_straight_through(
    soft_threshold: bool,
) -> None:
    # The k-th smallest magnitude *is* the threshold, so one weight always sits exactly on it.
    weight = torch.tensor([[0.15, -0.15, 0.3, -0.05]], requires_grad=True)
    param = SoftThresholdParametrization(soft_threshold=soft_threshold, straight_through=False, rescale=False)
    param.threshold.fill_(0.15)
    out = param(weight)
    assert out[0, :2].eq(0).all()
    out.sum().backward()
    assert torch.equal(weight.grad, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shrinkage", SHRINKAGES)
@pytest.mark.parametrize("rescale", [True, False])
def test_straight_through_forward_matches_the_reference(dtype: torch.dtype, shrinkage: str, rescale: bool) -> None:
    # The straight-through forward is computed in place, with fewer kernels: same zeros, same values up to rounding
    # of the rescale's sums, and bitwise the identity at threshold 0.
    generator = torch.Generator().manual_seed(0)
    for shape in [(16, 3, 3, 3), (10, 64), (4, 2, 5)]:
        w = torch.randn(shape, generator=generator).to(dtype)
        param = SoftThresholdParametrization(straight_through=True, rescale=rescale, shrinkage=shrinkage)
        for t in (0.0, 0.3, 0.8):
            param.threshold.fill_(t)
            got = param(w)
            expected = effective_weight(w, torch.tensor(t), rescale=rescale, shrinkage=shrinkage)
            assert got.dtype == dtype
            assert torch.equal(got == 0, expected == 0)
            tolerance = {"rtol": 1e-6, "atol": 0} if dtype in (torch.float32, torch.float64) else {}
            torch.testing.assert_close(got, expected, **tolerance)
            if t == 0.0:
                assert torch.equal(got, w)


@pytest.mark.parametrize("shrinkage", SHRINKAGES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "contiguous"])
def test_straight_through_forward_on_non_contiguous_weights(shrinkage: str, layout: str) -> None:
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 3, 3, generator=generator)
    if layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        w = torch.randn(4, 5, 3, generator=generator).transpose(1, 2)
    param = SoftThresholdParametrization(straight_through=True, rescale=True, shrinkage=shrinkage)
    param.threshold.fill_(0.5)
    got = param(w)
    expected = effective_weight(w.contiguous(), torch.tensor(0.5), rescale=True, shrinkage=shrinkage)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert not torch.signbit(got[got == 0]).any()  # pruned entries are +0.0, as in the reference


def test_pruned_is_exactly_the_zeros_of_the_effective_weight_also_when_frozen() -> None:
    param = SoftThresholdParametrization()
    weight = torch.tensor([[0.0, 0.5, 0.3, -0.1]])
    param.threshold.fill_(0.2)
    assert torch.equal(param.pruned(weight), param(weight) == 0)
    # Fine-tune phase: a kept weight that is exactly 0 is a zero of the effective weight too, so it counts.
    param.freeze(torch.tensor([[True, True, False, True]]))
    assert torch.equal(param.pruned(weight), torch.tensor([[True, False, True, False]]))
    assert torch.equal(param.pruned(weight), param(weight) == 0)


def test_a_layer_called_twice_before_backward_gets_the_exact_straight_through_gradient() -> None:
    # Weight sharing: the gradients of both uses of the effective weight reach the raw weight, unchanged.
    layer = nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)))
    parametrize.register_parametrization(layer, "weight", SoftThresholdParametrization())
    layer.parametrizations.weight[0].threshold.fill_(0.5)
    x = torch.randn(3, 6, requires_grad=True)
    weight = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    layer(layer(x) @ weight).square().sum().backward()
    # Reference: the same computation on a plain tensor holding the effective weight; straight-through gradient.
    raw = layer.parametrizations.weight.original.detach()
    effective = effective_weight(raw, torch.tensor(0.5)).requires_grad_()
    linear = torch.nn.functional.linear
    linear(linear(x, effective) @ weight, effective).square().sum().backward()
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, effective.grad, rtol=1e-5, atol=1e-6)


def _counted_layer(parametrization: SparseParametrization) -> tuple[nn.Linear, list[int]]:
    """A Linear layer carrying ``parametrization``, and a list counting the effective weights it builds."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    register_sparse_parametrization(layer, parametrization)
    built = [0]
    original = parametrization.effective

    def counted(weight: torch.Tensor) -> torch.Tensor:
        built[0] += 1
        return original(weight)

    parametrization.effective = counted  # type: ignore[method-assign]
    return layer, built


def test_reuse_outside_autograd_builds_the_effective_weight_once_until_something_changes() -> None:
    parametrization = SoftThresholdParametrization()
    layer, built = _counted_layer(parametrization)
    parametrization.threshold.fill_(0.2)
    raw = layer.parametrizations.weight.original

    def expected() -> torch.Tensor:
        return effective_weight(raw.detach(), parametrization.threshold)

    with torch.no_grad():
        _ = layer.weight, layer.weight
    assert built[0] == 2  # off by default: built at every read
    parametrization.reuse_outside_autograd = True
    with torch.inference_mode():
        first = layer.weight
        assert layer.weight is first
        assert built[0] == 3
    with torch.no_grad():
        assert layer.weight is first
        raw.mul_(2.0)  # an optimizer-like in-place update moves the raw weight's version
        torch.testing.assert_close(layer.weight, expected())
        assert built[0] == 4
        parametrization.threshold.fill_(0.5)  # so does a new threshold
        torch.testing.assert_close(layer.weight, expected())
        parametrization.rescale = False  # and a new setting
        torch.testing.assert_close(
            layer.weight, effective_weight(raw.detach(), parametrization.threshold, rescale=False)
        )
        assert built[0] == 6
    layer.double()  # new memory for the raw weight
    with torch.no_grad():
        assert layer.weight.dtype == torch.float64
        assert built[0] == 7
    # Under autograd the effective weight is built every time (its graph must be the current one) and the held one
    # is dropped.
    layer.weight.sum().backward()
    assert built[0] == 8
    assert parametrization._reused is None
    with torch.no_grad():
        _ = layer.weight
    assert parametrization._reused is not None
    parametrization.stop_reusing()
    assert parametrization._reused is None
    assert not parametrization.reuse_outside_autograd


def test_reuse_outside_autograd_sees_the_fine_tune_mask_and_str_thresholds() -> None:
    parametrization = SoftThresholdParametrization()
    layer, built = _counted_layer(parametrization)
    parametrization.reuse_outside_autograd = True
    raw = layer.parametrizations.weight.original
    mask = torch.rand(raw.shape) > 0.5
    with torch.no_grad():
        _ = layer.weight
        parametrization.freeze(mask)
        assert torch.equal(layer.weight, torch.where(mask, raw, 0.0))
    assert built[0] == 2
    str_parametrization = STRParametrization(s_init=-3.0)
    str_layer, str_built = _counted_layer(str_parametrization)
    str_parametrization.reuse_outside_autograd = True
    with torch.no_grad():
        _ = str_layer.weight
        str_parametrization.s.fill_(-1.0)  # the optimizer moves `s`
        raw = str_layer.parametrizations.weight.original
        assert torch.equal(str_layer.weight == 0, raw.abs() <= torch.sigmoid(torch.tensor(-1.0)))
    assert str_built[0] == 2


def test_reuse_outside_autograd_sees_new_memory_at_the_same_version() -> None:
    parametrization = SoftThresholdParametrization()
    layer, built = _counted_layer(parametrization)
    parametrization.reuse_outside_autograd = True
    raw = layer.parametrizations.weight.original
    with torch.no_grad():
        _ = layer.weight
        version = raw._version
        raw.data = torch.ones_like(raw)  # new memory, same version: only the address moved
        assert raw._version == version
        assert torch.equal(layer.weight, torch.ones_like(raw))
    assert built[0] == 2
