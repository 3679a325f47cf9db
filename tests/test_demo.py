"""The demo's pieces on tiny inputs, its command line, and one end-to-end ``--quick`` run."""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmcompile.cli import main
from nmcompile.demo import DemoConfig
from nmcompile.demo.data import (
    load_corpus,
    sample_offsets,
    spaced_offsets,
    stdlib_files,
    windows,
)
from nmcompile.demo.report import (
    flip_rate,
    matmul_flops,
    results_table,
    sparse_flop_share,
    write_outputs,
)


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    """A small tree shaped like a stdlib: packages, non-.py files, a site-packages to skip."""
    root = tmp_path / "lib"
    files = {f"mod{i:02d}.py": f"# module {i}\n" + "x = 1\n" * (i + 1) for i in range(40)}
    files |= {
        "pkg/__init__.py": "",
        "pkg/sub.py": "def f():\n    return 2\n",
        "site-packages/third.py": "THIRD = 1\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _in_val(rel: str) -> bool:
    """Reference split rule: the first 8 bytes of sha256(path) below 10% of 2**64."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) < 0.1 * 2**64


def test_stdlib_files_sorted_and_filtered(fake_stdlib: Path) -> None:
    names = [rel for rel, _ in stdlib_files(fake_stdlib)]
    expected = sorted([f"mod{i:02d}.py" for i in range(40)] + ["pkg/__init__.py", "pkg/sub.py"])
    assert names == expected


def test_corpus_split_is_by_file_hash_and_disjoint(fake_stdlib: Path) -> None:
    corpus = load_corpus(10**6, root=fake_stdlib)
    assert set(corpus.train_files).isdisjoint(corpus.val_files)
    assert sorted(corpus.train_files + corpus.val_files) == [
        r for r, _ in stdlib_files(fake_stdlib)
    ]
    assert all(_in_val(rel) for rel in corpus.val_files)
    assert not any(_in_val(rel) for rel in corpus.train_files)
    for data, files in ((corpus.train, corpus.train_files), (corpus.val, corpus.val_files)):
        expected = b"".join((fake_stdlib / rel).read_bytes() for rel in files)
        assert bytes(data.tolist()) == expected


def test_corpus_cap_is_deterministic(fake_stdlib: Path) -> None:
    cap = sum(path.stat().st_size for _, path in stdlib_files(fake_stdlib)) - 5  # cuts a file
    a, b = load_corpus(cap, root=fake_stdlib), load_corpus(cap, root=fake_stdlib)
    assert len(a.train) + len(a.val) == cap
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train_files == b.train_files
    # Files are taken in sorted order: the cap keeps a prefix of the sorted list.
    taken = sorted(a.train_files + a.val_files)
    assert taken == [r for r, _ in stdlib_files(fake_stdlib)][: len(taken)]


def test_corpus_rejects_cap_leaving_a_split_empty(fake_stdlib: Path) -> None:
    with pytest.raises(ValueError, match="split empty"):
        load_corpus(5, root=fake_stdlib)


def test_real_stdlib_corpus_loads_deterministically() -> None:
    a, b = load_corpus(400_000), load_corpus(400_000)
    assert len(a.train) + len(a.val) == 400_000
    assert len(a.val) > 0 and torch.equal(a.val, b.val) and a.train_files == b.train_files


def test_batches_are_seeded_and_in_bounds() -> None:
    a = sample_offsets(1000, steps=5, batch=4, seq_len=16, seed=3)
    assert torch.equal(a, sample_offsets(1000, 5, 4, 16, seed=3))
    assert not torch.equal(a, sample_offsets(1000, 5, 4, 16, seed=4))
    assert a.shape == (5, 4) and a.min() >= 0 and a.max() <= 1000 - 17
    starts = spaced_offsets(1000, 4, 16)
    assert starts.tolist() == [0, 327, 655, 983]


def test_windows_give_next_byte_targets() -> None:
    data = torch.arange(50, dtype=torch.uint8)
    x, y = windows(data, torch.tensor([0, 10]), seq_len=4)
    assert x.tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert y.tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]
    assert x.dtype == torch.int64


def test_matmul_flops() -> None:
    assert matmul_flops([[2048, 128], [128, 384]]) == 2 * 2048 * 128 * 384
    assert matmul_flops([[64, 128, 32], [64, 32, 128]]) == 2 * 64 * 128 * 32 * 128
    assert matmul_flops([[384], [2048, 128], [128, 384]]) == 2 * 2048 * 128 * 384  # bias first
    with pytest.raises(ValueError, match="two operand shapes"):
        matmul_flops([[4, 4]])


def test_sparse_flop_share_on_hand_made_summary() -> None:
    def rec(shapes, sparse):
        return {
            "graph_id": 0,
            "node": "mm",
            "role": None,
            "param": None,
            "shapes": shapes,
            "became": "x",
            "sparse": sparse,
            "reason": None,
        }

    summary = {
        "config": {},
        "matmuls": [
            rec([[100, 10], [10, 20]], True),  # 40,000 FLOPs
            rec([[20, 100], [100, 10]], True),  # 40,000
            rec([[10, 100], [100, 20]], False),  # 40,000
            rec([[4, 5, 5], [4, 5, 5]], False),  # 1,000
        ],
    }
    assert sparse_flop_share(summary) == pytest.approx(80_000 / 121_000, rel=1e-12)
    assert sparse_flop_share({"matmuls": []}) == 0.0


def test_flip_rate() -> None:
    before = {
        "a": torch.tensor([True, False, True, False]),
        "b": torch.ones(2, 2, dtype=torch.bool),
    }
    after = {
        "a": torch.tensor([False, False, True, True]),
        "b": torch.ones(2, 2, dtype=torch.bool),
        "c": torch.zeros(3, dtype=torch.bool),
    }
    assert flip_rate(before, after) == pytest.approx(2 / 8)
    assert math.isnan(flip_rate({}, after))


def _recipe(name: str, flips: float | None) -> dict:
    return {
        "name": name,
        "final_train_loss": 2.5,
        "final_val_loss": 2.75,
        "tokens_per_s": 12345.6,
        "mean_flip_rate": flips,
        "sparse_flop_share": 0.625,
        "train_curve": [(1, 5.0), (2, 4.0)],
        "val_curve": [(2, 4.5)],
        "flip_curve": [(2, 0.1)] if flips else [],
        "tail_start": None,
    }


def test_results_table_formats_figures() -> None:
    text = results_table([_recipe("dense", None), _recipe("sparse", 0.0125)])
    lines = text.splitlines()
    assert "2.5000" in lines[2] and "2.7500" in lines[2] and "12,346" in lines[2]
    assert "—" in lines[2] and "62.5%" in lines[2]
    assert "1.2500%" in lines[3]


def test_write_outputs(tmp_path: Path) -> None:
    report = {
        "model": {"d_model": 8, "n_layer": 1, "parameters": 1234},
        "steps": 2,
        "batch_size": 1,
        "seq_len": 4,
        "device": "cpu",
        "corpus": {"train_bytes": 10, "val_bytes": 2},
        "sparse_options": {"n": 2},
        "recipes": [_recipe("dense", None), _recipe("sparse", 0.1)],
        "notes": ["a note"],
    }
    write_outputs(tmp_path, report, "| table |")
    assert json.loads((tmp_path / "report.json").read_text())["recipes"][1]["mean_flip_rate"] == 0.1
    md = (tmp_path / "report.md").read_text()
    assert "| table |" in md and "a note" in md and "62.5%" in md
    assert "d_model 8, 1 layers, 1,234 parameters" in md
    for png in ("loss.png", "flip_rate.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- without the demo extra (matplotlib, tqdm) --------------------------------------------------
def _hide_by_sys_modules(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """``import name`` raises ImportError: ``sys.modules[name] = None``."""
    for module in list(sys.modules):
        if module.split(".")[0] in names:
            monkeypatch.delitem(sys.modules, module)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def _hide_by_import_hook(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """``import name`` raises ModuleNotFoundError, as for a package that is not installed."""
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    for module in list(sys.modules):
        if module.split(".")[0] in names:
            monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(builtins, "__import__", fake)


HIDE = [pytest.param(_hide_by_sys_modules, id="sys.modules"),
        pytest.param(_hide_by_import_hook, id="__import__")]


@pytest.mark.parametrize("hide", HIDE)
def test_write_outputs_without_matplotlib_writes_the_results_and_skips_the_plots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hide) -> None:
    from nmcompile.extras import INSTALL_HINT, missing

    hide(monkeypatch, "matplotlib")
    assert missing() == ["matplotlib"]
    report = {
        "model": {"d_model": 8, "n_layer": 1, "parameters": 1234},
        "steps": 2, "batch_size": 1, "seq_len": 4, "device": "cpu",
        "corpus": {"train_bytes": 10, "val_bytes": 2}, "sparse_options": {"n": 2},
        "recipes": [_recipe("dense", None), _recipe("sparse", 0.1)], "notes": [],
    }
    assert write_outputs(tmp_path, report, "| table |") == ["report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    assert json.loads((tmp_path / "report.json").read_text())["recipes"][1]["name"] == "sparse"
    md = (tmp_path / "report.md").read_text()
    assert "| table |" in md and "62.5%" in md and "loss.png" not in md
    assert "Plots skipped: matplotlib is not installed" in md and INSTALL_HINT in md


@pytest.mark.parametrize("hide", HIDE)
def test_progress_bars_without_tqdm(monkeypatch: pytest.MonkeyPatch, hide) -> None:
    from nmcompile.extras import missing, progress

    hide(monkeypatch, "tqdm")
    assert missing() == ["tqdm"]
    bar = progress(range(3), desc="x", disable=False)
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(loss="1.0")
    bar.close()


def test_cli_says_what_to_install_before_training(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    import nmcompile.demo
    from nmcompile.demo import DemoResult

    _hide_by_import_hook(monkeypatch, "matplotlib", "tqdm")

    def fake_run_demo(cfg):  # the note must be out before the minutes of training start
        err = capsys.readouterr().err
        assert "matplotlib is not installed" in err and "tqdm is not installed" in err
        assert 'pip install "nmcompile[demo]"' in err
        report = {"recipes": [_recipe("dense", None)], "notes": ["n1"], "total_wall_s": 1.0}
        return DemoResult(report, "", ("report.json", "report.md"))

    monkeypatch.setattr(nmcompile.demo, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "report.json, report.md, dump/" in out and "loss.png" not in out


def test_run_demo_without_the_extras_eager_backends(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from nmcompile.demo import DemoConfig, run_demo
    from nmcompile.demo import run as demo_run

    monkeypatch.setattr(demo_run, "DENSE_BACKEND", "eager")
    _hide_by_sys_modules(monkeypatch, "matplotlib", "tqdm")
    cfg = DemoConfig(steps=3, batch_size=2, seq_len=8, d_model=8, layers=1, out=str(tmp_path),
                     corpus_bytes=200_000, sparse_backend="eager", evals=1, flip_every=1)
    result = run_demo(cfg)
    assert result.files == ("report.json", "report.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    notes = result.report["notes"]
    assert any(n.startswith("matplotlib is not installed") for n in notes)
    assert any(n.startswith("tqdm is not installed") for n in notes)
    assert all(len(r["train_curve"]) == 3 for r in result.report["recipes"])


@pytest.mark.slow
def test_demo_trains_and_writes_results_without_the_extras(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``pip install nmcompile`` without ``[demo]``: both recipes train, the table, report and
    JSON are written, the plots are skipped with a note (small sizes, no Inductor)."""
    from nmcompile.demo import run as demo_run

    monkeypatch.setattr(demo_run, "DENSE_BACKEND", "eager")
    monkeypatch.setitem(demo_run.SPARSE_OPTIONS, "inductor", False)
    _hide_by_import_hook(monkeypatch, "matplotlib", "tqdm")
    out = tmp_path / "out"
    argv = ["demo", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--d-model", "16",
            "--layers", "1", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert "final val loss" in captured.out and "note: matplotlib is not installed" in \
        captured.out
    assert sorted(p.name for p in out.iterdir()) == ["dump", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["recipes"]] == ["dense", "sparse 2:4"]
    assert all(len(r["train_curve"]) == 4 for r in report["recipes"])
    assert any("matplotlib is not installed" in note for note in report["notes"])
    assert "Plots skipped" in (out / "report.md").read_text()



def test_cli_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--steps",
        "--batch-size",
        "--seq-len",
        "--d-model",
        "--layers",
        "--device",
        "--seed",
        "--out",
        "--quick",
    ):
        assert flag in out
    for argv in (
        [],
        ["demo", "--steps", "0"],
        ["demo", "--bogus"],
        ["demo", "--device", "tpu"],
        ["demo", "--d-model", "30"],
        ["train"],
    ):
        assert main(argv) == 2, argv
    assert "usage:" in capsys.readouterr().err


def test_cli_cuda_unavailable_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert not (tmp_path / "report.json").exists()


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nmcompile", "demo", "--steps", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--steps" in proc.stderr


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "final val loss" in printed and "nm.linear_forward" in printed
    report = json.loads((out / "report.json").read_text())
    dense, sparse = report["recipes"]
    for r in (dense, sparse):
        assert r["final_val_loss"] < math.log(256) - 0.5  # learned something from uniform
        assert r["tokens_per_s"] > 0
    # Same init and first batch; the sparse loss differs only by the 2:4 mask on tiny weights.
    (s0, d0), (s1, d1) = dense["train_curve"][0], sparse["train_curve"][0]
    assert s0 == s1 == 1 and abs(d0 - math.log(256)) < 0.05 and abs(d0 - d1) < 0.02
    assert dense["mean_flip_rate"] is None and 0 <= sparse["mean_flip_rate"] <= 1
    assert dense["sparse_flop_share"] == 0 and 0.5 < sparse["sparse_flop_share"] <= 1
    # the last tail_fraction of the 40 steps are the dense tail
    assert sparse["tail_start"] == 40 - round(40 * DemoConfig().tail_fraction) < 40
    # the switch is continuous: the weights are pruned, the loss does not jump
    assert sparse["val_loss_after_switch"] <= sparse["val_loss_before_tail"] * 1.005
    for name in ("loss.png", "flip_rate.png", "report.md", "dump/summary.json", "dump/summary.txt"):
        assert (out / name).is_file(), name


def test_the_seed_drives_init_batches_and_mvue_draws() -> None:
    """``--seed`` sets the init, the batches and (``run_demo`` seeds torch's generator with it
    before each recipe) the RNG stream of the MVUE draws: the same stream repeats a run
    exactly; another one alone changes the sparse recipe's losses (MVUE), not the dense one's."""
    from nmcompile.demo import DemoConfig
    from nmcompile.demo.run import SPARSE_OPTIONS, make_model, make_schedule, sparse_phases
    from nmcompile.demo.train import Phase, train_recipe

    def cfg(seed: int) -> DemoConfig:
        return DemoConfig(steps=3, batch_size=2, seq_len=8, d_model=8, layers=1, seed=seed,
                          corpus_bytes=200_000, evals=1, flip_every=1, progress=False)

    corpus = load_corpus(200_000)
    first = lambda model: next(model.parameters()).detach()  # noqa: E731
    assert torch.equal(first(make_model(cfg(1))), first(make_model(cfg(1))))
    assert not torch.equal(first(make_model(cfg(1))), first(make_model(cfg(2))))
    assert not torch.equal(make_schedule(cfg(1), corpus).offsets,
                           make_schedule(cfg(2), corpus).offsets)
    schedule = make_schedule(cfg(1), corpus)
    sparse = sparse_phases(cfg(1), {**SPARSE_OPTIONS, "inductor": False, "min_numel": 0})
    curves = {}
    for name, phases, streams in (("dense", [Phase(0, "eager")], (1, 2)),
                                  ("sparse", sparse, (1, 2, 1))):
        for rng in streams:
            torch._dynamo.reset()
            model = make_model(cfg(1))  # seeds torch's generator with the init seed
            torch.manual_seed(rng)
            rec = train_recipe(name, model, phases, schedule, progress=False)
            assert curves.setdefault((name, rng), rec["train_curve"]) == rec["train_curve"]
    assert curves["dense", 1] == curves["dense", 2]
    assert curves["sparse", 1] != curves["sparse", 2]
