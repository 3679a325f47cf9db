import pytest

from nmcompile import NMConfig


def test_defaults_resolve_to_transposable_2_4():
    cfg = NMConfig.from_options(None)
    assert (cfg.n, cfg.m) == (2, 4)
    assert cfg.forward == "transposable" and cfg.grad_input == "transposable"
    assert cfg.grad_weight == "dense" and cfg.inductor is True


def test_auto_falls_back_to_rowwise_for_large_m():
    cfg = NMConfig.from_options({"n": 4, "m": 8})
    assert cfg.forward == "rowwise" and cfg.grad_input == "dense"


def test_config_object_and_overrides():
    base = NMConfig(n=1, m=4, min_numel=0)
    cfg = NMConfig.from_options({"config": base, "grad_input": "dense"})
    assert (cfg.n, cfg.m, cfg.min_numel, cfg.grad_input) == (1, 4, 0, "dense")


@pytest.mark.parametrize(
    "options, words",
    [
        ({"bogus": 1}, ["'bogus'", "valid options", "grad_weight"]),
        ({"n": 4, "m": 4}, ["n=4", "m=4", "0 < n < m"]),
        ({"n": 0}, ["n=0"]),
        ({"m": 4.0}, ["NMConfig.m", "int"]),
        ({"n": True}, ["NMConfig.n", "int"]),
        ({"forward": "magic"}, ["forward='magic'", "transposable", "rowwise"]),
        ({"grad_input": "x"}, ["grad_input='x'", "dense"]),
        ({"grad_weight": "sparse"}, ["grad_weight='sparse'", "dense"]),
        ({"min_numel": -1}, ["min_numel"]),
        ({"inductor": "yes"}, ["inductor"]),
        ({"n": 4, "m": 8, "transposable_method": "patterns"}, ["m <= 4", "'mcf'"]),
        ({"forward": "transposable", "grad_input": "bimask"}, ["grad_input='bimask'", "rowwise"]),
        ({"mask_interval": 0}, ["mask_interval", ">= 1"]),
        ({"micro_steps": 0}, ["micro_steps", ">= 1"]),
        ({"micro_steps": 2.0}, ["NMConfig.micro_steps", "int"]),
        ({"grad_weight": "fst", "n": 3, "m": 4}, ["grad_weight='fst'", "n to divide m", "3:4"]),
        ({"bimask_method": "best"}, ["bimask_method='best'", "optimized"]),
        ({"forward": "rowwise", "grad_input": "transposable"}, ["grad_input='dense'"]),
        ({"config": {"n": 2}}, ["options['config']"]),
        ({"exclude": "lm_head"}, ["NMConfig.exclude", "sequence"]),
        ({"param_filter": 3}, ["param_filter", "callable"]),
        ({"extra_exclude": "*lora_*"}, ["NMConfig.extra_exclude", "sequence"]),
        ({"adapters": "masked"}, ["adapters='masked'", "dense", "sparse"]),
        ({"mvue_n": 4, "mvue_m": 16}, ["mvue_n:mvue_m=4:16", "<= 8"]),
        ({"mvue_n": 2, "mvue_m": 2}, ["mvue_n:mvue_m=2:2"]),
        ({"kernels": "cusparselt"}, ["kernels='cusparselt'", "auto", "sparse", "emulate"]),
        ({"mode": "fast"}, ["mode='fast'", "reduce-overhead", "max-autotune"]),
        ({"prune": "soft"}, ["prune='soft'", "hard", "sste"]),
        ({"prune": None}, ["prune=None", "hard", "sste"]),
        ({"prune": "sste", "forward": "rowwise", "grad_input": "bimask"},
         ["prune='sste'", "Bi-Mask", "grad_input='dense'"]),
        ({"mode": "reduce-overhead", "inductor": False}, ["mode='reduce-overhead'",
                                                          "inductor=True"]),
    ],
)
def test_bad_options_name_the_key(options, words):
    with pytest.raises(ValueError) as info:
        NMConfig.from_options(options)
    for word in words:
        assert word in str(info.value)


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NMCOMPILE_DUMP_DIR", str(tmp_path))
    assert NMConfig.from_options({}).dump_dir == str(tmp_path)
    assert NMConfig.from_options({"dump_dir": "elsewhere"}).dump_dir == "elsewhere"
    monkeypatch.delenv("NMCOMPILE_DUMP_DIR")
    assert NMConfig.from_options({}).dump_dir is None


def test_config_is_frozen():
    cfg = NMConfig()
    with pytest.raises(AttributeError):
        cfg.n = 1


def test_mode_from_torch_compile_reaches_the_config():
    """``torch.compile(m, backend="nm", mode=...)`` hands the backend ``mode=`` (not options)."""
    import torch

    from nmcompile.backend import NMOptionError, nm_backend

    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    with pytest.raises(NMOptionError, match="mode='turbo'"):
        nm_backend(gm, [torch.randn(2)], mode="turbo")
    assert NMConfig.from_options({"mode": "max-autotune"}).uses_cuda_graphs
    assert not NMConfig.from_options({"mode": "max-autotune-no-cudagraphs"}).uses_cuda_graphs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"])
def test_torch_compile_modes_compile_and_mask(mode):
    """``torch.compile(..., backend="nm", mode=...)`` compiles with Inductor's mode (CUDA graphs
    only apply on a GPU) and the rewrite: the output is the masked layer's."""
    import torch

    import nmcompile

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    compiled = torch.compile(lin, backend="nm", mode=mode)
    x = torch.randn(8, 64, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    mask = nmcompile.masks(lin)["weight"]
    want = x.detach() @ torch.where(mask, lin.weight.detach(), 0).t() + lin.bias.detach()
    torch.testing.assert_close(out.detach(), want)
    assert x.grad is not None


def test_exclude_replaces_the_defaults_extra_exclude_extends_them():
    head = "lm_head.weight"
    assert NMConfig().excludes(head, None) == "excluded by pattern '*lm_head*'"
    replaced = NMConfig(exclude=["*classifier*"])
    assert replaced.excludes(head, None) is None  # the defaults are gone
    assert replaced.excludes("classifier.weight", None) == "excluded by pattern '*classifier*'"
    extended = NMConfig(extra_exclude=["*classifier*"])
    assert extended.excludes(head, None) == "excluded by pattern '*lm_head*'"
    assert extended.excludes("classifier.weight", None) == "excluded by pattern '*classifier*'"
    assert extended.excludes("blocks.0.fc.weight", None) is None
    assert extended.extra_exclude == ("*classifier*",)  # lists become tuples (hashable config)
