"""The ``nmcompile`` command line: ``dump``, ``solve``, ``bench``, help and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nmcompile import cli_tools, read_summary
from nmcompile.cli import main
from nmcompile.solvers import transposable_mask


def _is_transposable(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    r, c = mask.shape
    return bool(mask.reshape(r, c // m, m).sum(-1).max() <= n
                and mask.t().reshape(c, r // m, m).sum(-1).max() <= n)


def test_python_dash_m_help_and_missing_command():
    ok = subprocess.run([sys.executable, "-m", "nmcompile", "solve", "--help"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--method" in ok.stdout and "CHECKPOINT" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "nmcompile"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "COMMAND" in bad.stderr


@pytest.mark.parametrize("command", ["demo", "dump", "solve", "prune", "bench"])
def test_help_of_every_command_exits_0(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: nmcompile {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["solve"],                                              # missing CHECKPOINT
    ["solve", "x.pt", "--method", "lp"],                    # unknown method
    ["solve", "x.pt", "--n", "4", "--m", "4"],              # n must be < m
    ["solve", "x.pt", "--method", "patterns", "--n", "4", "--m", "8"],
    ["dump", "tinygpt", "--n", "0"],
    ["bench", "--quick"],                                   # no such flag
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_dump_tinygpt_writes_summary_and_prints_table(tmp_path, capsys):
    out = tmp_path / "dump"
    argv = ["dump", "tinygpt", "--no-inductor", "--out", str(out), "--set", "d_model=32",
            "--set", "n_layer=1", "--set", "n_head=2", "--set", "seq_len=16",
            "--set", "vocab_size=64"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = read_summary(out)["matmuls"]
    sparse = {(r["param"], r["role"]) for r in rows if r["sparse"]}
    linears = ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.fc.weight",
               "blocks.0.out.weight", "head.weight"]
    assert sparse == {(name, role) for name in linears for role in ("forward", "grad_input")}
    assert ("blocks.0.fc.weight" in text and "nm.linear_forward" in text
            and f"{sum(r['sparse'] for r in rows)} of {len(rows)} matmuls sparse (2:4)" in text)
    qkv = next(r for r in rows if r["param"] == "blocks.0.attn.qkv.weight")
    assert [32, 96] in qkv["shapes"]  # the --set overrides reached the model


def test_dump_transformers_json_config(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed")
    config = tmp_path / "bert.json"
    config.write_text(json.dumps({
        "model_type": "bert", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}))
    out = tmp_path / "dump"
    assert main(["dump", str(config), "--no-inductor", "--out", str(out), "--seq-len", "8"]) == 0
    rows = read_summary(out)["matmuls"]
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert {r["role"] for r in rows if r["param"] == query and r["sparse"]} == {
        "forward", "grad_input"}
    embed = [r for r in rows if r["param"] == "bert.embeddings.word_embeddings.weight"
             and r["role"] == "forward"]
    assert embed and embed[0]["reason"] == "excluded by pattern '*embed*'"
    assert "BertForMaskedLM (bert)" in capsys.readouterr().out


def test_dump_unknown_model_exits_1(capsys):
    assert main(["dump", "no-such-model", "--no-inductor"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.fixture
def checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {
        "fc.weight": torch.randn(16, 32, generator=gen),
        "fc.bias": torch.randn(16, generator=gen),
        "embed.weight": torch.randn(64, 16, generator=gen),
        "odd.weight": torch.randn(6, 8, generator=gen),
    }
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path, state


def _kept(w: torch.Tensor, mask: torch.Tensor) -> float:
    return float((w.abs() * mask).sum() / w.abs().sum())


@pytest.mark.parametrize("method", ["mcf", "patterns", "greedy", "auto"])
def test_solve_masks_every_eligible_weight(checkpoint, tmp_path, capsys, method):
    path, state = checkpoint
    out = tmp_path / "masks.pt"
    assert main(["solve", str(path), "--method", method, "--out", str(out),
                 "--no-progress"]) == 0
    masks = torch.load(out)
    assert sorted(masks) == ["fc.weight"]
    w, mask = state["fc.weight"], masks["fc.weight"]
    assert mask.dtype == torch.bool and _is_transposable(mask)
    exact = _kept(w, transposable_mask(w, 2, 4, method="patterns"))
    if method == "greedy":
        assert exact / 2 <= _kept(w, mask) <= exact + 1e-6  # a 2-approximation
    else:
        assert _kept(w, mask) == pytest.approx(exact, abs=1e-6)
    text = capsys.readouterr().out
    assert f"{_kept(w, mask):.4f}" in text  # the table's kept-|W| column
    assert "skipped odd.weight: shape (6, 8): dims not multiples of m=4" in text
    assert "skipped embed.weight: excluded by pattern '*embed*'" in text


def test_solve_all_includes_embeddings_and_4_of_8(checkpoint, tmp_path):
    path, state = checkpoint
    out = tmp_path / "masks.pt"
    assert main(["solve", str(path), "--all", "--n", "4", "--m", "8", "--method", "mcf",
                 "--out", str(out), "--no-progress"]) == 0
    masks = torch.load(out)
    assert sorted(masks) == ["embed.weight", "fc.weight"]
    assert all(_is_transposable(m, 4, 8) for m in masks.values())


@pytest.mark.parametrize("content, message", [
    (None, "cannot read checkpoint"),
    (b"not a checkpoint", "cannot read checkpoint"),
    ({"w": torch.ones(4, 4), "step": 3, "lr": 0.1}, "non-tensor entries: lr, step"),
    ([torch.ones(4, 4)], "holds a list, not a state_dict"),
])
def test_solve_bad_checkpoint_exits_1(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert main(["solve", str(path), "--no-progress", "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m.pt").exists()


def test_bench_runs_the_script_quick_and_reports_gpu(tmp_path, monkeypatch, capfd):
    script = tmp_path / "solvers.py"
    script.write_text("import sys; print('ARGS', sys.argv[1:]); sys.exit(len(sys.argv) - 2)")
    monkeypatch.setattr(cli_tools, "_BENCH", script)
    assert main(["bench"]) == 0  # --quick passed: exit code 0
    out = capfd.readouterr().out
    assert "ARGS ['--quick']" in out
    gpu = "cuda rows above" if torch.cuda.is_available() else "skipped, no CUDA device"
    assert f"GPU benchmark: {gpu}" in out
    assert main(["bench", "--full"]) == 1  # the script's exit code -1 -> failure
    monkeypatch.setattr(cli_tools, "_BENCH", tmp_path / "missing.py")
    assert main(["bench"]) == 1
    assert "not found" in capfd.readouterr().err


@pytest.mark.slow
def test_bench_real_quick_run(capfd):
    assert main(["bench"]) == 0
    out = capfd.readouterr().out
    assert "| 1024x1024 | 2:4     | mcf" in out


def _trained_checkpoint(tmp_path):
    import nmcompile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                torch.nn.Linear(32, 16))
    compiled = torch.compile(model, backend="nm", options={"inductor": False, "min_numel": 0})
    x = torch.randn(8, 16)
    out = compiled(x)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "masks": nmcompile.mask_state_dict(model),
                "step": 1}, path)
    return model, x, out.detach(), path


def test_prune_writes_the_pruned_state_dict_and_masks(tmp_path, capsys):
    model, x, sparse_out, ckpt = _trained_checkpoint(tmp_path)
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(ckpt), "--out", str(out)]) == 0
    assert "2 weights pruned" in capsys.readouterr().out
    pruned = torch.load(out, weights_only=True)
    masks = torch.load(tmp_path / "pruned.masks.pt", weights_only=True)
    assert set(masks) == {"0.weight", "2.weight"}
    for name, value in model.state_dict().items():
        want = torch.where(masks[name], value, 0) if name in masks else value
        assert torch.equal(pruned[name], want), name
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                torch.nn.Linear(32, 16))
    fresh.load_state_dict(pruned)  # served dense, it computes what the sparse model did
    torch.testing.assert_close(fresh(x), sparse_out)


def test_prune_with_masks_from_solve(tmp_path):
    torch.manual_seed(0)
    state = {"w": torch.randn(8, 16), "b": torch.randn(8)}
    torch.save(state, tmp_path / "sd.pt")
    torch.save({"w": transposable_mask(state["w"], 2, 4)}, tmp_path / "m.pt")
    assert main(["prune", str(tmp_path / "sd.pt"), "--masks", str(tmp_path / "m.pt"),
                 "--out", str(tmp_path / "p.pt"), "--masks-out", str(tmp_path / "k.pt")]) == 0
    pruned = torch.load(tmp_path / "p.pt", weights_only=True)
    assert torch.equal(pruned["w"], torch.where(transposable_mask(state["w"], 2, 4),
                                                state["w"], 0))
    assert torch.equal(pruned["b"], state["b"]) and (tmp_path / "k.pt").exists()


@pytest.mark.parametrize("masks, message", [
    (None, "no masks in"),
    ({"missing.weight": torch.ones(8, 16, dtype=torch.bool)}, "does not have"),
    ({"w": torch.ones(16, 8, dtype=torch.bool)}, "the mask of w is (16, 8)"),
    ({"w": torch.ones(8, 16)}, "not a bool tensor"),
])
def test_prune_bad_inputs_exit_1(tmp_path, capsys, masks, message):
    data = {"model": {"w": torch.randn(8, 16)}}
    if masks is not None:
        data["masks"] = masks
    torch.save(data, tmp_path / "c.pt")
    assert main(["prune", str(tmp_path / "c.pt"), "--out", str(tmp_path / "p.pt")]) == 1
    assert message in capsys.readouterr().err
