"""The cached-plan path's Python side (:mod:`nmcompile.kernels.cusparselt_plans`), on CPU against a
fake cuSPARSELt library (:mod:`tests.cslt_library_fake`) that computes through raw addresses, with
the strict CPU model of ``torch._cslt_*`` (the ``cslt`` fixture) as the reference it is checked
against: argument marshalling, plan keys, per-call bias pointers, eviction, threads, the
self-check and its fallback, CUDA-graph capture, and a compiled training step."""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcompile
from nmcompile.kernels import cusparselt, cusparselt_lib, cusparselt_plans
from nmcompile.kernels.cusparselt_plans import PlanKey
from nmcompile.solvers import transposable_mask
from tests.cslt_library_fake import FakeCusparseLt

BF16 = torch.bfloat16


@pytest.fixture
def fake(cslt):
    """A clean fake library serving CPU tensors (``fake.plans_path``: the path object)."""
    lib = FakeCusparseLt(cslt)
    with cusparselt_plans.using(lib) as plans:
        lib.plans_path = plans
        yield lib
    assert not lib.errors, lib.errors  # every call the path made was one the library takes


def _sparse(m, k, dtype=BF16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=gen)
    return torch.where(transposable_mask(w, 2, 4), w, 0).to(dtype)


def _rand(*shape, dtype=BF16, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _torch_mm(*args, **kwargs):
    """``torch._cslt_sparse_mm`` itself (the model), bypassing the plans."""
    return torch._cslt_sparse_mm(*args, **kwargs)


# -- 1. the dispatcher's three call forms run on cached plans -----------------------------------
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("tokens", [13, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grad_input_through_plans(fake, cslt, dtype, tokens, bias):
    wm = _sparse(64, 96, dtype)
    x, b = _rand(tokens, 96, dtype=dtype), (_rand(64, dtype=dtype, seed=2) if bias else None)
    before = fake.calls["cusparseLtMatmul"]
    out = cusparselt.linear_forward(x, cusparselt.compress(wm), b, 64)
    ref = x.double() @ wm.double().t() + (b.double() if bias else 0)
    assert out.shape == (tokens, 64) and out.dtype == dtype and _rel(out, ref) < 1e-2
    padded = torch.cat([x, x.new_zeros(-tokens % 8, 96)])
    expected = _torch_mm(cusparselt.compress(wm), padded.t(), b, transpose_result=True)
    assert torch.equal(out, expected[:tokens])  # the library's own numbers, bit for bit
    gi = cusparselt.linear_grad_input(out, cusparselt.compress(wm.t().contiguous()), 96)
    assert _rel(gi, out.double() @ wm.double()) < 1e-2
    # two self-check calls per new key (forward, grad-input) and the two calls themselves
    assert fake.calls["cusparseLtMatmul"] - before == 6
    cusparselt.linear_forward(x, cusparselt.compress(wm), b, 64)
    assert fake.calls["cusparseLtMatmulPlanInit"] == 2  # the repeated key reused its plan


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
def test_grad_weight_through_plans(fake, b_layout):
    a = _sparse(48, 64)
    b = _rand(64, 40) if b_layout == "contiguous" else _rand(40, 64).t()
    out = cusparselt.sparse_mm_packed(cusparselt.compress(a), b)
    assert torch.equal(out, _torch_mm(cusparselt.compress(a), b))
    key = next(iter(fake.plans_path.cache().plans))
    assert key == PlanKey(48, 64, 40, BF16, b_layout == "transposed", False, False, 0)


# -- 2. plan keys ----------------------------------------------------------------------------------
BASE = dict(m=32, k=64, n=16, dtype=BF16, b_transposed=True, transpose_result=True, bias=True,
            alg_id=0)
VARIANTS = {"m": 48, "k": 96, "n": 24, "dtype": torch.float16, "b_transposed": False,
            "transpose_result": False, "bias": False, "alg_id": 5}


def _call(plans, m, k, n, dtype, b_transposed, transpose_result, bias, alg_id, seed=0):
    a = cusparselt.compress(_sparse(m, k, dtype, seed))
    b = _rand(n, k, dtype=dtype).t() if b_transposed else _rand(k, n, dtype=dtype)
    bias_t = _rand(m, dtype=dtype, seed=seed + 7) if bias else None
    out = plans.matmul(a, b, bias_t, transpose_result, alg_id)
    assert out is not None
    ref = _torch_mm(a, b, bias_t, transpose_result=transpose_result, alg_id=alg_id)
    assert torch.equal(out, ref)
    return out


@pytest.mark.parametrize("field", list(VARIANTS))
def test_each_key_field_gets_its_own_plan(fake, field):
    plans = fake.plans_path
    _call(plans, **BASE)
    _call(plans, **BASE, seed=3)  # other data, same key: the same plan
    assert fake.calls["cusparseLtMatmulPlanInit"] == 1
    _call(plans, **{**BASE, field: VARIANTS[field]})
    assert fake.calls["cusparseLtMatmulPlanInit"] == 2, field
    _call(plans, **{**BASE, field: VARIANTS[field]}, seed=4)
    assert fake.calls["cusparseLtMatmulPlanInit"] == 2
    # each key: its self-check (two calls), then two calls
    assert plans.stats() == {"plans": 2, "hits": 6, "misses": 2, "evictions": 0}


def test_bias_pointer_is_set_at_every_call(fake):
    """One plan, two bias tensors: each call adds its own (the pointer is not the plan's)."""
    plans = fake.plans_path
    first = _call(plans, **BASE, seed=0)
    again = _call(plans, **BASE, seed=10)  # asserts equality with torch for the other bias
    assert not torch.equal(first, again)
    assert fake.calls["cusparseLtMatmulPlanInit"] == 1


# -- 3. eviction, threads --------------------------------------------------------------------------
def test_least_recently_used_plan_is_evicted_and_destroyed(cslt):
    lib = FakeCusparseLt(cslt)
    keys = [{**BASE, "n": n} for n in (16, 24, 32)]
    with cusparselt_plans.using(lib, max_plans=2) as plans:
        for key in keys:
            _call(plans, **key)
        cache = plans.cache()
        assert [k.n for k in cache.plans] == [24, 32] and cache.evictions == 1
        # the evicted plan's objects are gone from the library
        assert lib.calls["cusparseLtMatmulPlanDestroy"] == 1
        assert lib.calls["cusparseLtMatDescriptorDestroy"] == 3
        assert lib.calls["cusparseLtMatmulAlgSelectionDestroy"] == 1
        assert len(lib.plans) == 2 and len(lib.descs) == 6
        _call(plans, **keys[1])  # a hit moves 24 to the end
        _call(plans, **keys[0])  # 16 is built again; 32, now the oldest, goes
        assert [k.n for k in cache.plans] == [24, 16] and cache.evictions == 2
        # 16, 24, 32: a self-check (two calls) and a call each; 24 again; 16 again (a miss,
        # no new self-check: its verdict is kept)
        assert plans.stats() == {"plans": 2, "hits": 7, "misses": 4, "evictions": 2}
        cache.clear()
        assert not lib.plans and not lib.descs and not lib.algs
    assert not lib.errors, lib.errors


def test_each_thread_has_its_own_handle_and_plans(fake):
    plans = fake.plans_path
    here = _call(plans, **BASE)
    there = []
    thread = threading.Thread(target=lambda: there.append(_call(plans, **BASE)))
    thread.start()
    thread.join()
    assert torch.equal(here, there[0])
    assert len(fake.handles) == 2 and len(plans.caches) == 2
    assert fake.calls["cusparseLtMatmulPlanInit"] == 2  # one plan per thread, one self-check


# -- 4. the self-check and the fallback ----------------------------------------------------
@pytest.mark.parametrize("fault, reason", [
    ("wrong_layout", "differs from torch._cslt_sparse_mm"),
    ("stale_bias", "differs from torch._cslt_sparse_mm"),
    ("plan_init", "cusparseLtMatmulPlanInit returned status 3"),
    ("matmul", "cusparseLtMatmul returned status 3"),
])
def test_a_failing_key_falls_back_to_torch_with_one_warning(cslt, caplog, fault, reason):
    lib = FakeCusparseLt(cslt, fault=fault)
    wm, x, b = _sparse(64, 96), _rand(32, 96), _rand(64, seed=2)
    with cusparselt_plans.using(lib) as plans:
        with pytest.warns(RuntimeWarning, match="failed its self-check") as seen:
            out = cusparselt.linear_forward(x, cusparselt.compress(wm), b, 64)
        assert len(seen) == 1 and reason in str(seen[0].message)
        expected = _torch_mm(cusparselt.compress(wm), x.t(), b, transpose_result=True)
        assert torch.equal(out, expected)
        (key, why), = plans.failures().items()
        assert key == PlanKey(64, 96, 32, BF16, True, True, True, 0) and reason in why
        if fault == "plan_init":  # what was made before the failing step was destroyed again
            assert not lib.descs and not lib.algs and not lib.plans
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
            warnings.simplefilter("error")  # a second failing key is logged, not warned
            x2 = _rand(48, 96, seed=5)
            again = cusparselt.linear_forward(x2, cusparselt.compress(wm), b, 64)
        assert "64x96x48 bf16, B transposed, result transposed, bias, alg 0 goes through" in (
            caplog.text)
        assert torch.equal(again, _torch_mm(cusparselt.compress(wm), x2.t(), b,
                                            transpose_result=True))
        assert len(plans.failures()) == 2


def test_the_bias_check_has_a_positive_control(fake):
    """Without the fault, the same bias key passes and runs on its plan."""
    wm, x, b = _sparse(64, 96), _rand(32, 96), _rand(64, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cusparselt.linear_forward(x, cusparselt.compress(wm), b, 64)
    assert not fake.plans_path.failures() and fake.calls["cusparseLtMatmul"] == 3


def test_a_first_use_under_capture_goes_through_torch_unchecked(cslt):
    capturing = [True]
    lib = FakeCusparseLt(cslt)
    wm, x = _sparse(64, 96), _rand(32, 96)
    with cusparselt_plans.using(lib, capturing=lambda: capturing[0]) as plans:
        mm = cslt.mm_calls
        out = cusparselt.linear_forward(x, cusparselt.compress(wm), None, 64)
        assert cslt.mm_calls == mm + 1 and not lib.calls  # torch's call; no check, no plan
        capturing[0] = False
        again = cusparselt.linear_forward(x, cusparselt.compress(wm), None, 64)
        assert torch.equal(out, again) and lib.calls["cusparseLtMatmul"] == 3
        capturing[0] = True  # checked now: its plan serves captured calls too
        cusparselt.linear_forward(x, cusparselt.compress(wm), None, 64)
        assert lib.calls["cusparseLtMatmul"] == 4 and plans.stats()["misses"] == 1


# -- 5. operands the library would misread ---------------------------------------------------------
def test_misread_operands_are_refused(fake):
    plans = fake.plans_path
    a = cusparselt.compress(_sparse(32, 64))
    flat = _rand(64 * 16 + 4)
    misaligned = flat[4:].view(64, 16)  # 8 bytes past an aligned start
    with pytest.raises(ValueError, match="aligned"):
        plans.matmul(a, misaligned, None, False, 0)
    with pytest.raises(ValueError, match="bias"):
        plans.matmul(a, _rand(64, 16), _rand(31), False, 0)
    with pytest.raises(ValueError, match="fewer than"):  # a blob cut short
        plans.matmul(a.reshape(-1)[:32 * 30].view(32, 30), _rand(64, 16), None, False, 0)
    fixed = cusparselt.dense_operand(misaligned)  # the dispatcher copies such an operand
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, misaligned)
    assert torch.equal(cusparselt.sparse_mm_packed(a, misaligned),
                       _torch_mm(a, misaligned.clone()))


def test_no_library_on_a_cpu_build_of_torch(monkeypatch):
    monkeypatch.setattr(cusparselt_plans, "_PATHS", {})
    assert cusparselt_lib.loaded_path() is None
    with pytest.raises(OSError, match="no cuSPARSELt"):
        cusparselt_lib.load()
    assert cusparselt_plans.for_device("cpu") is None  # outside `using`: never on CPU
    assert cusparselt_plans.status("cuda:0") == (
        "the cuSPARSELt library cannot be called directly: this torch build has no cuSPARSELt")
    monkeypatch.setattr(cusparselt_plans, "_PATHS", {})
    monkeypatch.setenv(cusparselt_plans.ENV_PLANS, "0")
    assert cusparselt_plans.status("cuda:0") == "turned off by NMCOMPILE_CSLT_PLANS=0"


# -- 6. a compiled training step -----------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _train(dump, steps=2):
    torch.manual_seed(0)
    model = Mlp().bfloat16()
    compiled = torch.compile(model, backend="nm", options={
        "inductor": False, "min_numel": 0, "kernels": "sparse", "grad_weight": "mvue",
        "dump_dir": str(dump)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = compiled(torch.randn(4, 8, 64, generator=gen).to(BF16)).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    kernels = {(r["role"], r["kernel"]) for r in nmcompile.read_summary(dump)["matmuls"]
               if r["kernel"]}
    return torch.stack(losses), list(model.parameters()), kernels


def test_a_compiled_step_runs_on_plans_checked_when_compiled(cslt, tmp_path, monkeypatch):
    """The three GEMM roles of a bf16 MLP (MVUE grad-weight) run on cached plans, with torch's
    numbers; every key the step uses was predicted and checked when the graph was compiled."""
    ref_losses, ref_params, _ = _train(tmp_path / "torch")
    lib = FakeCusparseLt(cslt)
    at_compile: set = set()
    real_note = cusparselt.plans_note

    def note(*args, **kwargs):
        found = real_note(*args, **kwargs)
        at_compile.update(plans._verdicts)
        return found

    monkeypatch.setattr(cusparselt, "plans_note", note)
    with cusparselt_plans.using(lib) as plans:
        losses, params, kernels = _train(tmp_path / "plans")
        stats = plans.stats()
    assert at_compile and set(plans._verdicts) == at_compile  # none first met at run time
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params, strict=True))
    assert {role for role, _ in kernels} == {"forward", "grad_input", "grad_weight"}
    assert {kernel for _, kernel in kernels} == {"cuSPARSELt"}, kernels
    # forward (with and without bias), grad-input, grad-weight: checked once each, at compile
    # time (a check builds the plan); the steps then only hit
    assert stats["misses"] == len(plans._verdicts) and not plans.failures()
    assert stats["hits"] > 2 * stats["misses"] and not lib.errors


def test_a_compiled_step_names_the_fallback_in_the_dump(cslt, tmp_path):
    """A library that misreads a transposed dense operand: the forward and grad-input GEMMs
    (which pass one) go through torch, with the reason in the dump's kernel column; the
    grad-weight GEMM (contiguous operand) keeps its plans."""
    ref_losses, _, _ = _train(tmp_path / "torch")
    lib = FakeCusparseLt(cslt, fault="wrong_layout")
    with cusparselt_plans.using(lib), pytest.warns(RuntimeWarning, match="failed its self-c"):
        losses, _, kernels = _train(tmp_path / "plans")
    assert torch.equal(losses, ref_losses)  # every GEMM computed right
    fallback = "cuSPARSELt (torch's per-call plans: cached plan failed its self-check at "
    for role, kernel in kernels:
        assert kernel.startswith(fallback) == (role != "grad_weight"), (role, kernel)
    assert all("its result differs from torch._cslt_sparse_mm's" in k
               for role, k in kernels if role != "grad_weight")
