"""FSDP2 (``fully_shard``) through the ``nm`` backend: 2 gloo processes on CPU.

One 2-rank job runs every scenario in turn (each a fresh model, ``torch._dynamo.reset()``
between them) and saves what each rank ends with: the full weights, ``nmcompile.masks``,
``stats()``' refresh counts, the dump and the warnings. The tests compare each scenario with
one process training the same model, compiled the same way, on the whole global batch.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import nmcompile
from nmcompile import read_summary
from nmcompile.config import DEFAULT_EXCLUDE
from nmcompile.fallback import DenseFallbackWarning
from tests.multiprocess import (
    WORLD,
    process_group,
    regression_batches,
    sgd,
    spawn,
    train_on_shards,
)

STEPS = 3
WIDTH = 64
GLOBAL_BATCH = 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
        self.fc2 = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """Two blocks called in a loop between root-level linear layers (``inp`` and a head named
    ``head``, or ``lm_head``, which the default layer filter keeps dense)."""

    def __init__(self, head: str = "head") -> None:
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head_name = head
        setattr(self, head, nn.Linear(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return getattr(self, self.head_name)(x)


#: name -> (fully_shard layout, what is compiled, head name, backend options)
SCENARIOS = {
    # torch.compile(model) after fully_shard on blocks and root: the loop over FSDP blocks makes
    # Dynamo run Net.forward eagerly (its inp layer trains dense, warned); excluded: inp, lm_head
    "blocks+root/compile(model)": ("blocks+root", "model", "lm_head",
                                   {"exclude": [*DEFAULT_EXCLUDE, "inp*"]}),
    "root/compile(model)/interval2": ("root", "model", "head", {"mask_interval": 2}),
    "blocks+root/compile(blocks) before/mcf": (
        "blocks+root", "blocks-before", "head", {"transposable_method": "mcf"}),
    "blocks+root/compile(blocks) after/bimask": (
        "blocks+root", "blocks-after", "head", {"grad_input": "bimask"}),
    "blocks+root/compile(blocks) after/sparse_stop2": (
        "blocks+root", "blocks-after", "head", {"sparse_stop": 2}),
    "blocks+root/compile(model)/unread": ("blocks+root", "model", "head", {}),
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return regression_batches(STEPS, GLOBAL_BATCH, WIDTH)


def _build(layout: str, compiles: str, head: str, options: dict, shard: bool):
    """The model and the callable to train (``shard=False``: the single-process reference,
    compiled the same way)."""
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net(head)
    if compiles == "blocks-before":
        for block in model.blocks:
            block.compile(backend="nm", options=options)
    if shard:
        if layout == "blocks+root":
            for block in model.blocks:
                fully_shard(block)
        fully_shard(model)
    if compiles == "blocks-after":
        for block in model.blocks:
            block.compile(backend="nm", options=options)
    if compiles == "model":
        return model, torch.compile(model, backend="nm", options=options)
    return model, model


def _worker(rank: int, port: int, out: str, names: list[str]) -> None:
    with process_group(rank, port):
        for i, name in enumerate(names):
            layout, compiles, head, options = SCENARIOS[name]
            dump = os.path.join(out, f"dump_{i}_{rank}")
            options = {"inductor": False, **options, "dump_dir": dump}
            torch._dynamo.utils.counters.clear()
            model, compiled = _build(layout, compiles, head, options, shard=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_on_shards(compiled, sgd(model), _batches(), rank, WORLD)
            # every rank calls these (an all-gather per in-graph mask)
            found, stats = nmcompile.masks(model), nmcompile.stats(model)
            full = {k: v.full_tensor() for k, v in model.state_dict().items()}
            applied = nmcompile.apply_masks(model)  # prunes each rank's shard
            pruned = {k: v.full_tensor() for k, v in model.state_dict().items()}
            torch.save({"state": full, "masks": found, "applied": applied, "pruned": pruned,
                        "refreshes": {k: s.refreshes for k, s in stats.items()},
                        "phases": {k: s.phase for k, s in stats.items()},
                        "dense_warnings": [str(w.message) for w in caught
                                           if issubclass(w.category, DenseFallbackWarning)],
                        "dump": dump},
                       os.path.join(out, f"{i}_rank{rank}.pt"))


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """scenario name -> [what rank 0 saved, what rank 1 saved]."""
    out = tmp_path_factory.mktemp("fsdp")
    names = list(SCENARIOS)
    spawn(_worker, out, names)
    return {name: [torch.load(out / f"{i}_rank{r}.pt") for r in range(WORLD)]
            for i, name in enumerate(names)}


def _reference(name: str):
    layout, compiles, head, options = SCENARIOS[name]
    model, compiled = _build(layout, compiles, head, {"inductor": False, **options},
                             shard=False)
    train_on_shards(compiled, sgd(model), _batches())
    return model


def _sparse_layers(name: str) -> list[str]:
    """The weights the scenario's graphs mask (in one process)."""
    _, compiles, head, options = SCENARIOS[name]
    layers = [f"blocks.{b}.fc{i}.weight" for b in (0, 1) for i in (1, 2)]
    if compiles == "model" and "exclude" not in options and head == "head":
        layers = ["inp.weight", *layers, "head.weight"]  # what one process masks
    return layers


@pytest.mark.parametrize("name", [n for n in SCENARIOS if not n.endswith("/unread")])
def test_fsdp2_two_ranks_match_single_process(fsdp_runs, name):
    ranks = fsdp_runs[name]
    model = _reference(name)
    ref_masks = nmcompile.masks(model)
    ref_stats = nmcompile.stats(model)
    ref_refreshes = {k: s.refreshes for k, s in ref_stats.items()}
    ref_phases = {k: s.phase for k, s in ref_stats.items()}
    masked = _sparse_layers(name)
    # masks in use: none once the last call ran dense (after pruning at sparse_stop)
    layers = [] if SCENARIOS[name][3].get("sparse_stop") == STEPS - 1 else masked
    assert sorted(ref_masks) == sorted(layers)
    for r, got in enumerate(ranks):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, k=key, r=r: f"rank {r} {k}: {m}")
        # full-shape masks, keyed by named_parameters() names, equal on every rank and to
        # the single process's
        assert sorted(got["masks"]) == sorted(layers), f"rank {r}"
        for layer in layers:
            mask = got["masks"][layer]
            assert mask.dtype == torch.bool and mask.shape == value_shape(model, layer)
            assert torch.equal(mask, ranks[0]["masks"][layer]), (r, layer)
            assert torch.equal(mask, ref_masks[layer]), (r, layer)
            assert 0.45 < mask.float().mean().item() <= 0.5, layer
        # apply_masks: W <- W*M on every shard, the masks it returns are masks()
        assert sorted(got["applied"]) == sorted(layers)
        for key, value in got["state"].items():
            mask = got["applied"].get(key)
            expected = value if mask is None else value * mask
            assert torch.equal(got["pruned"][key], expected), (r, key)
        assert got["refreshes"] == ref_refreshes, f"rank {r}"
        assert got["phases"] == ref_phases, f"rank {r}"
        assert not got["dense_warnings"], got["dense_warnings"]
        summary = read_summary(got["dump"])
        assert not summary["unread"]
        # the dump names weights as named_parameters() does (not relative to a compiled block)
        named = {row["param"] for row in summary["matmuls"] if row["sparse"]}
        assert named and named <= set(masked), named


def value_shape(model: nn.Module, name: str) -> torch.Size:
    return dict(model.named_parameters())[name].shape


def test_fsdp2_layers_dynamo_runs_eagerly_are_listed_and_warned(fsdp_runs):
    """fully_shard per block + torch.compile(model): Net.forward runs eagerly (a graph break
    in a loop), so inp and head train dense; both are named in a warning and in the dump."""
    for got in fsdp_runs["blocks+root/compile(model)/unread"]:
        assert len(got["dense_warnings"]) == 1, got["dense_warnings"]
        message = got["dense_warnings"][0]
        assert "['head.weight', 'inp.weight']" in message and "train DENSE" in message
        assert "shard only the root" in message and "of the Net compiled" in message
        summary = read_summary(got["dump"])
        assert sorted(summary["unread"]) == ["head.weight", "inp.weight"]
        assert "trains DENSE" in summary["unread"]["inp.weight"]
        assert "weights no graph reads" in (Path(got["dump"]) / "summary.txt").read_text()
        # the blocks' layers are masked, and nmcompile.masks says which were
        assert sorted(got["masks"]) == [f"blocks.{b}.fc{i}.weight" for b in (0, 1)
                                        for i in (1, 2)]


#: the resume check: refresh every 2 steps, so the checkpoint after step 3 is mid-interval
RESUME_OPTIONS = {"inductor": False, "mask_interval": 2}
RESUME_AT = 3


def _resume_worker(rank: int, port: int, out: str) -> None:
    """An uninterrupted run of RESUME_AT + 1 steps; a run stopped after RESUME_AT steps and
    checkpointed (model and optimizer with torch.distributed.checkpoint, masks with
    torch.save), resumed in a fresh model for the last step; and the same resume without the
    mask state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    batches = regression_batches(RESUME_AT + 1, GLOBAL_BATCH, WIDTH, seed=2)

    def fresh():
        model, compiled = _build("blocks+root", "blocks-after", "head", RESUME_OPTIONS, True)
        return model, compiled, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def full(model):
        return {k: v.full_tensor() for k, v in model.state_dict().items()}

    with process_group(rank, port):
        model, compiled, opt = fresh()
        train_on_shards(compiled, opt, batches, rank, WORLD)
        results = {"uninterrupted": full(model)}

        model, compiled, opt = fresh()
        train_on_shards(compiled, opt, batches[:RESUME_AT], rank, WORLD)
        state_model, state_optim = get_state_dict(model, opt)
        dcp.save({"model": state_model, "optim": state_optim}, checkpoint_id=f"{out}/ckpt")
        mask_state = nmcompile.mask_state_dict(model)  # full masks, the same on every rank
        if rank == 0:
            torch.save(mask_state, f"{out}/masks.pt")
        dist.barrier()
        results["saved_masks"] = mask_state

        for label, load_masks in (("resumed", True), ("resumed without masks", False)):
            model, compiled, opt = fresh()
            state_model, state_optim = get_state_dict(model, opt)
            state = {"model": state_model, "optim": state_optim}
            dcp.load(state, checkpoint_id=f"{out}/ckpt")
            set_state_dict(model, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            if load_masks:
                nmcompile.load_mask_state_dict(model, torch.load(f"{out}/masks.pt"))
            train_on_shards(compiled, opt, batches[RESUME_AT:], rank, WORLD)
            results[label] = full(model)
        torch.save(results, os.path.join(out, f"resume_rank{rank}.pt"))


def test_fsdp2_resumed_run_takes_the_uninterrupted_steps(tmp_path):
    spawn(_resume_worker, tmp_path)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"resume_rank{r}.pt")
        masks = got["saved_masks"]
        assert sorted(masks) == [f"blocks.{b}.fc{i}.weight" for b in (0, 1) for i in (1, 2)]
        assert all(entry["forward"].shape == value_shape(Net(), k) for k, entry in masks.items())
        assert {entry["steps"] for entry in masks.values()} == {1}  # mid-interval
        for key, value in got["uninterrupted"].items():
            torch.testing.assert_close(got["resumed"][key], value, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, k=key, r=r: f"rank {r} {k}: {m}")
        # the check has teeth: without the mask state the resumed step solves new masks
        assert any(not torch.allclose(got["resumed without masks"][k], v, rtol=1e-5, atol=1e-6)
                   for k, v in got["uninterrupted"].items() if ".fc" in k)


def _mixed_precision_worker(rank: int, port: int, out: str) -> None:
    """fully_shard with param_dtype=bfloat16: the graphs read bf16 unsharded weights; after 2
    steps, nmcompile.masks() must equal the mask of the weight the next forward reads."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from nmcompile.masking import compute_mask, record_of

    with process_group(rank, port):
        torch.manual_seed(0)
        model = Net()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
            block.compile(backend="nm", options={"inductor": False})
        fully_shard(model, mp_policy=policy)
        train_on_shards(model, sgd(model), _batches()[:2], rank, WORLD)
        reported = nmcompile.masks(model)
        seen = {}

        def capture(module, args):
            for name in ("fc1", "fc2"):
                weight = getattr(module, name).weight
                seen[name] = (weight.detach().clone(), compute_mask(weight.detach(),
                                                                    record_of(weight).spec))

        model.blocks[1].register_forward_pre_hook(capture)
        with torch.no_grad():
            model(_batches()[2][0])
        torch.save({"reported": reported, "seen": seen}, os.path.join(out, f"mp_rank{rank}.pt"))


def test_fsdp2_mixed_precision_masks_are_the_masks_of_the_bf16_weights(tmp_path):
    spawn(_mixed_precision_worker, tmp_path)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"mp_rank{r}.pt")
        for name in ("fc1", "fc2"):
            weight, applied = got["seen"][name]
            assert weight.dtype == torch.bfloat16  # the unsharded copy the graph reads
            assert torch.equal(got["reported"][f"blocks.1.{name}.weight"], applied), (r, name)


def _worker_nccl(rank: int, port: int, out: str) -> None:
    with process_group(rank, port, backend="nccl"):
        torch.cuda.set_device(rank)
        torch.manual_seed(0)
        from torch.distributed.fsdp import fully_shard

        model = Net().cuda()
        for block in model.blocks:
            fully_shard(block)
            block.compile(backend="nm", options={"inductor": False})
        fully_shard(model)
        batches = [(x.cuda(), y.cuda()) for x, y in _batches()]
        train_on_shards(model, sgd(model), batches, rank, WORLD)
        found = {k: v.cpu() for k, v in nmcompile.masks(model).items()}
        full = {k: v.full_tensor().cpu() for k, v in model.state_dict().items()}
        torch.save({"masks": found, "state": full}, os.path.join(out, f"nccl_rank{rank}.pt"))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD,
                    reason=f"needs {WORLD} CUDA GPUs for the NCCL variant")
def test_fsdp2_nccl_two_gpus_match_single_process(tmp_path):
    spawn(_worker_nccl, tmp_path)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    for block in model.blocks:
        block.compile(backend="nm", options={"inductor": False})
    train_on_shards(model, sgd(model), _batches())
    ref = nmcompile.masks(model)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"nccl_rank{r}.pt")
        assert sorted(got["masks"]) == sorted(ref)
        for name, mask in ref.items():
            # GPU weights vs the CPU reference: near-ties may flip, nothing more
            assert (got["masks"][name] == mask).float().mean() > 0.999, name
        for key, value in model.state_dict().items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-3, atol=1e-5)


class _Counted:
    """``torch._cslt_compress`` and ``torch._cslt_sparse_mm`` (the library, or the CPU model of
    it) replaced by wrappers that count their calls."""

    def __init__(self) -> None:
        self.compress_calls = self.mm_calls = 0
        compress, sparse_mm = torch._cslt_compress, torch._cslt_sparse_mm

        def counted_compress(*args, **kwargs):
            self.compress_calls += 1
            return compress(*args, **kwargs)

        def counted_mm(*args, **kwargs):
            self.mm_calls += 1
            return sparse_mm(*args, **kwargs)

        torch._cslt_compress, torch._cslt_sparse_mm = counted_compress, counted_mm


def _pack_writes(model: nn.Module) -> int:
    """Compressed weights written so far for ``model``'s masked weights, by any writer (the
    Triton sparsify kernels, the pure-torch encoder or ``torch._cslt_compress``)."""
    from nmcompile.state import _named_records

    return sum(pack.compressions for *_, record in _named_records(model)
               for pack in record.packs.values())


def _kernel_worker(rank: int, port: int, out: str, world: int = WORLD) -> None:
    """bf16 FSDP2 (MixedPrecisionPolicy) with per-block compiles, 2 micro-steps per optimizer
    step, on the sparse-kernel path, then the same with the masked-dense emulation: on CPU
    (gloo) through the strict CPU model of cuSPARSELt, on a GPU (NCCL) through the library."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tests.cslt_model import CusparseltModel

    cuda = torch.cuda.is_available()
    os.environ["NMCOMPILE_CACHE_DIR"] = os.path.join(out, f"cache{rank}")
    if cuda:
        torch.cuda.set_device(rank)
    else:
        os.environ["NMCOMPILE_CSLT_ON_CPU"] = "1"
        model_of_library = CusparseltModel()
        torch._cslt_compress = model_of_library.compress
        torch._cslt_sparse_mm = model_of_library.sparse_mm
    cslt = _Counted()
    device = "cuda" if cuda else "cpu"
    with process_group(rank, port, world, "nccl" if cuda else "gloo"):
        results = {}
        for kernels in ("sparse", "emulate"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = Net().to(device)
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
            for block in model.blocks:
                fully_shard(block, mp_policy=policy)
                block.compile(backend="nm", options={"inductor": False, "kernels": kernels})
            fully_shard(model, mp_policy=policy)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            compressions, calls, used = [], [], []
            per_rank = GLOBAL_BATCH // world // 2
            for x, y in _batches():
                x, y = (t[rank * 2 * per_rank:(rank + 1) * 2 * per_rank].to(device)
                        for t in (x, y))
                opt.zero_grad()
                for micro in range(2):
                    part = slice(micro * per_rank, (micro + 1) * per_rank)
                    loss = nn.functional.mse_loss(model(x[part]).float(), y[part]) / 2
                    loss.backward()
                used.append({k: v.cpu() for k, v in nmcompile.masks(model).items()})
                opt.step()
                compressions.append(_pack_writes(model))
                calls.append(cslt.mm_calls)
            results[kernels] = {
                "state": {k: v.full_tensor().cpu() for k, v in model.state_dict().items()},
                "masks": used, "compressions": compressions, "calls": calls}
        torch.save(results, os.path.join(out, f"kernels_rank{rank}.pt"))


def _check_kernel_run(out: Path, world: int, mask_agreement: float) -> None:
    for r in range(world):
        got = torch.load(out / f"kernels_rank{r}.pt")
        sparse, emulated = got["sparse"], got["emulate"]
        for step, masks in enumerate(emulated["masks"]):
            assert sorted(masks) == _sparse_layers("blocks+root/compile(blocks) after/bimask")
            for name, mask in masks.items():
                same = (sparse["masks"][step][name] == mask).float().mean().item()
                assert same >= mask_agreement, (r, step, name, same)
        for key, value in emulated["state"].items():
            torch.testing.assert_close(sparse["state"][key], value, rtol=2e-2, atol=2e-3,
                                       msg=lambda m, k=key, r=r: f"rank {r} {k}: {m}")
        # per optimizer step (2 micro-steps): each block's W*M of fc1 and fc2 and (W*M)^T of
        # both (the block's input needs a gradient) compressed once, 2 blocks: 8; the GEMMs:
        # 2 forward + 2 grad-input per block per micro-step, all on the sparse kernel
        steps = torch.tensor(sparse["compressions"]).diff().tolist()
        assert steps == [8] * (STEPS - 1), sparse["compressions"]
        assert torch.tensor(sparse["calls"]).diff().tolist() == [2 * 2 * 2 * 2] * (STEPS - 1)
        assert emulated["calls"][-1] == sparse["calls"][-1]  # the emulation made no call


def test_fsdp2_sparse_kernels_train_like_the_emulation_compressing_once_per_step(tmp_path):
    spawn(_kernel_worker, tmp_path)
    _check_kernel_run(tmp_path, WORLD, mask_agreement=1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp2_cusparselt_one_gpu_trains_like_the_emulation(tmp_path):
    """The same on one GPU (NCCL, world size 1) with the real cuSPARSELt kernels."""
    spawn(_kernel_worker, tmp_path, 1, nprocs=1)
    # bf16 kernels against bf16 dense GEMMs: weights within bf16 error, near-ties may flip
    _check_kernel_run(tmp_path, 1, mask_agreement=0.999)


def _tensor_parallel_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    with process_group(rank, port):
        torch.manual_seed(0)
        block = parallelize_module(Block(), init_device_mesh("cpu", (WORLD,)),
                                   {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        compiled = torch.compile(block, backend="nm", options={"inductor": False})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(torch.randn(8, WIDTH)).sum().backward()
        torch.save({"warnings": [str(w.message) for w in caught
                                 if issubclass(w.category, DenseFallbackWarning)],
                    "counters": dict(torch._dynamo.utils.counters["nmcompile"])},
                   os.path.join(out, f"tp_rank{rank}.pt"))


def test_tensor_parallel_dtensor_parameters_train_dense_with_a_warning(tmp_path):
    """DTensor parameters inside the graph cannot be mapped to the flattened local shards: the
    graph is left dense, and a DenseFallbackWarning names the parameters."""
    spawn(_tensor_parallel_worker, tmp_path)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"tp_rank{r}.pt")
        assert len(got["warnings"]) == 1, got["warnings"]
        assert "'fc1.weight'" in got["warnings"][0] and "trains DENSE" in got["warnings"][0]
        assert not got["counters"].get("forward_sparse")


def _gpt2(shard: bool):
    """A small Hugging Face GPT-2 (its Conv1D weights are ``[in, out]``), each block compiled
    with masks refreshed every 2 steps, sharded per block and at the root if ``shard``."""
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2,
                                       n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    model.loss_type = "ForCausalLM"  # else a warning inside forward breaks the graph
    for block in model.transformer.h:
        block.compile(backend="nm", options={"inductor": False, "mask_interval": 2})
        if shard:
            fully_shard(block)
    if shard:
        fully_shard(model)
    return model


def _train_gpt2(model, rank: int = 0, world: int = 1) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        tokens = torch.randint(0, 256, (8, 32), generator=gen)
        tokens = tokens[rank * 8 // world:(rank + 1) * 8 // world]
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _gpt2_worker(rank: int, port: int, out: str) -> None:
    with process_group(rank, port):
        model = _gpt2(shard=True)
        _train_gpt2(model, rank, WORLD)
        found = nmcompile.masks(model)
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        torch.save({"masks": found, "state": full}, os.path.join(out, f"gpt2_rank{rank}.pt"))


def test_fsdp2_hugging_face_gpt2_matches_single_process(tmp_path):
    pytest.importorskip("transformers")
    spawn(_gpt2_worker, tmp_path)
    model = _gpt2(shard=False)
    _train_gpt2(model)
    ref = nmcompile.masks(model)
    assert len(ref) == 8  # 2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"gpt2_rank{r}.pt")
        assert sorted(got["masks"]) == sorted(ref)
        for name, mask in ref.items():
            assert torch.equal(got["masks"][name], mask), (r, name)
        for key, value in model.state_dict().items():
            if key in got["state"]:  # the tied lm_head.weight is transformer.wte.weight
                torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, k=key, r=r: f"rank {r} {k}: {m}")
