"""``torch.func`` transforms through a module compiled with ``backend="nm"``.

Dynamo refuses to compile a frame inside an eager functorch transform: such calls run dense,
with one DenseFallbackWarning per module naming the transform, and ordinary calls before and
after them run the nm graphs (checked against the fp64 masked reference). A transform that is
itself compiled hands the backend its graph and runs sparse.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import nmcompile
from nmcompile import DenseFallbackWarning
from nmcompile.transforms import transform_chain
from tests.reference import check_against_masked_reference, masked_reference


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _grad_input(m, x):
    return grad(lambda x: m(x).square().sum())(x)


def _per_sample(m, x):
    return vmap(m)(x.unsqueeze(1)).squeeze(1)


def _jacobian(m, x):
    return jacrev(m)(x[:2])


def _param_grads(m, x):
    """functional_call under grad: the gradient of every parameter (the model's own ones)."""
    params = {k: v.detach() for k, v in m.named_parameters()}
    found = grad(lambda p: functional_call(m, p, (x,)).square().sum())(params)
    return torch.cat([g.reshape(-1) for g in found.values()])


def _per_sample_grads(m, x):
    """vmap over grad over functional_call: per-sample gradients of every parameter."""
    params = {k: v.detach() for k, v in m.named_parameters()}
    found = vmap(grad(lambda p, x: functional_call(m, p, (x,)).square().sum()),
                 in_dims=(None, 0))(params, x[:3])
    return torch.cat([g.reshape(3, -1) for g in found.values()], dim=1)


TRANSFORMS = {"grad": (_grad_input, "torch.func.grad"),
              "vmap": (_per_sample, "torch.func.vmap"),
              "jacrev": (_jacobian, "torch.func.jacrev"),
              "functional_call": (_param_grads, "torch.func.grad > torch.func.functional_call"),
              "per_sample_grads": (_per_sample_grads, "torch.func.vmap > torch.func.grad > "
                                                      "torch.func.functional_call")}


def _setup():
    torch.manual_seed(0)
    model = Mlp()
    compiled = torch.compile(model, backend="nm", options={"inductor": False})
    return model, compiled, torch.optim.SGD(model.parameters(), lr=0.05)


def _train_step(model, compiled, opt):
    """One ordinary training step, checked against the fp64 masked reference (sparse)."""
    x = torch.randn(8, 32, requires_grad=True)
    y = compiled(x)
    cotangent = torch.randn_like(y)
    (y * cotangent).sum().backward()
    masks = nmcompile.masks(model)
    assert sorted(masks) == ["fc1.weight", "fc2.weight"]  # an nm graph ran
    check_against_masked_reference(model, x, y, cotangent, masks)
    opt.step()
    opt.zero_grad()


def _dense(model):
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("trained_first", [False, True], ids=["first-call", "after-training"])
def test_a_transform_runs_dense_warns_once_and_training_stays_sparse(name, trained_first):
    transform, label = TRANSFORMS[name]
    model, compiled, opt = _setup()
    x = torch.randn(8, 32)
    if trained_first:
        _train_step(model, compiled, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = transform(compiled, x)
        again = transform(compiled, x)  # once per module
    dense = [w for w in caught if issubclass(w.category, DenseFallbackWarning)]
    assert len(dense) == 1, [str(w.message) for w in dense]
    message = str(dense[0].message)
    assert f"inside {label}." in message and "Mlp.forward (" in message
    assert "DENSE" in message and dense[0].filename == __file__
    # what the warning says: the dense model's numbers
    expected = transform(_dense(model), x.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseFallbackWarning)
        _train_step(model, compiled, opt)  # sparse again, nothing dense to warn about
        _train_step(model, compiled, opt)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_compiled_transform_runs_sparse(name):
    """torch.compile around the transform: the nm graph serves it (no warning), with the
    masked forward and straight-through weight gradients of training."""
    transform, _ = TRANSFORMS[name]
    torch.manual_seed(0)
    model = Mlp()
    x = torch.randn(8, 32)

    def apply(x):  # the model's own Parameters: the backend masks what it reads as those
        if transform is _param_grads:
            found = grad(lambda p: functional_call(model, p, (x,)).square().sum())(
                dict(model.named_parameters()))
            return torch.cat([g.reshape(-1) for g in found.values()])
        if transform is _per_sample_grads:
            found = vmap(grad(lambda p, x: functional_call(model, p, (x,)).square().sum()),
                         in_dims=(None, 0))(dict(model.named_parameters()), x[:3])
            return torch.cat([g.reshape(3, -1) for g in found.values()], dim=1)
        return transform(model, x)

    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseFallbackWarning)
        out = torch.compile(apply, backend="nm", options={"inductor": False})(x)
    masks = nmcompile.masks(model)
    assert sorted(masks) == ["fc1.weight", "fc2.weight"]
    expected = transform(masked_reference(model, masks), x.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    dense = transform(_dense(model), x.double())
    assert not torch.allclose(out.double(), dense, rtol=1e-3, atol=1e-3)


def test_functional_call_alone_runs_the_nm_graph():
    """Positive control: functional_call outside any transform is an ordinary call."""
    model, compiled, _ = _setup()
    x = torch.randn(8, 32)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseFallbackWarning)
        y = functional_call(compiled, params, (x,))
        compiled(x)  # masks() lists the model's own Parameters (the same values, masks)
    ref = masked_reference(model, nmcompile.masks(model))
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-4, atol=1e-5)


def test_ordinary_training_warns_nothing():
    """Positive control: no transform, no fallback, no warning, sparse at every step."""
    model, compiled, opt = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DenseFallbackWarning)
        for _ in range(3):
            _train_step(model, compiled, opt)


def test_first_call_inside_a_transform_in_a_fresh_process():
    """The issue's case in a process where nothing compiled before: the very first call of
    the compiled module is inside torch.func.grad; the next ordinary call runs the nm graph."""
    script = textwrap.dedent(
        """
        import warnings, torch
        import nmcompile
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 16))
        compiled = torch.compile(model, backend="nm", options={"inductor": False})
        x = torch.randn(8, 32)
        params = {k: v.detach() for k, v in model.named_parameters()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.func.grad(lambda p: torch.func.functional_call(compiled, p, (x,)).sum())(params)
        print(sum(issubclass(w.category, nmcompile.DenseFallbackWarning) for w in caught))
        compiled(x).sum().backward()
        print(sorted(nmcompile.masks(model)))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.split("\n")[:2] == ["1", "['0.weight', '2.weight']"], out.stdout


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen: list[str] = []

    def forward(self, x):
        self.seen.append(transform_chain())
        return self.fc(x)


def test_the_transform_named_is_the_user_s_call():
    """What the warning names: the user's torch.func calls, outermost first, not the ones
    torch.func makes itself (jacfwd's vmap; hessian is jacfwd over jacrev)."""
    m, x = _Recorder(), torch.randn(2, 4)
    params = dict(m.named_parameters())
    vmap(m)(x)
    jacfwd(m)(x)
    hessian(lambda x: m(x).sum())(x)
    vmap(grad(lambda p, x: functional_call(m, p, (x,)).sum()), in_dims=(None, 0))(params, x)
    assert m.seen == ["torch.func.vmap", "torch.func.jacfwd",
                      "torch.func.jacfwd > torch.func.jacrev",
                      "torch.func.vmap > torch.func.grad > torch.func.functional_call"]
