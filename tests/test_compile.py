"""The parametrization is compile-friendly: no graph break, no recompilation when the threshold changes."""

import pytest
import torch
from torch import nn

from lightning_stthree import register_st3_parametrization


@pytest.mark.parametrize("straight_through", [True, False])
def test_compiled_forward_and_backward_match_eager_without_recompiling(straight_through: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    parametrizations = [
        register_st3_parametrization(m, straight_through=straight_through) for m in (model[0], model[3])
    ]
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; error_on_recompile raises if a new threshold value recompiles.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for threshold in (0.0, 0.05, 0.1, 0.2):
            for p in parametrizations:
                p.threshold.fill_(threshold)
            model.zero_grad()
            compiled(x).square().sum().backward()
            compiled_grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            expected = model(x)
            expected.square().sum().backward()
            torch.testing.assert_close(compiled(x), expected)
            for got, want in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
                torch.testing.assert_close(got, want)
