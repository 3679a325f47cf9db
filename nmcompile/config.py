"""``NMConfig``: every setting of the ``nm`` backend, validated once, before any tracing.

Each GEMM of a linear layer has its own policy, as in torchao's float8 training config:

* ``forward`` - how the forward mask of each weight is chosen (N:M along in-features);
* ``grad_input`` - what the grad-input GEMM ``dX = dY @ (W*mask)`` runs on;
* ``grad_weight`` - what the grad-weight GEMM ``dW = dY.T @ X`` runs on.

Of the backend's options, only ``dump_dir`` has an environment variable
(``NMCOMPILE_DUMP_DIR``), read here; the solvers' C kernel reads its build settings itself
(:mod:`nmcompile.solvers.native`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .integrations.peft import adapter_layer
from .solvers.mvue import MAX_M as MVUE_MAX_M
from .solvers.patterns import MAX_PATTERN_M

__all__ = [
    "ADAPTER_POLICIES",
    "DEFAULT_EXCLUDE",
    "FORWARD_POLICIES",
    "KERNEL_POLICIES",
    "MODES",
    "GRAD_INPUT_POLICIES",
    "GRAD_WEIGHT_POLICIES",
    "MVUE_METHODS",
    "NMConfig",
    "PRUNE_FUNCTIONS",
    "TRANSPOSABLE_METHODS",
]

#: ``forward``: ``transposable`` = exact max-magnitude mask with at most n per row and column of
#: every m x m tile (serves forward and grad-input); ``rowwise`` = top-n of every m along
#: in-features (forward only); ``auto`` = transposable where an exact in-graph solver exists
#: (m <= 4), else rowwise.
FORWARD_POLICIES = ("auto", "transposable", "rowwise")
#: ``transposable_method``: how a transposable mask is solved. ``patterns`` = exhaustive
#: pattern search traced into the graph (m <= 4); ``mcf`` = OR-Tools min-cost flow (exact, any
#: m) and ``greedy`` = the 2-approximation, both run outside the graph at each refresh;
#: ``auto`` = patterns if m <= 4, else mcf.
TRANSPOSABLE_METHODS = ("auto", "patterns", "mcf", "greedy")
#: ``grad_input``: ``transposable`` = reuse the transposable forward mask, sparse GEMM;
#: ``dense`` = the exact gradient dY @ (W*mask) on a dense GEMM; ``bimask`` = a separate
#: backward mask, N:M along out-features after an output-channel permutation (Bi-Mask, with a
#: row-wise forward mask), sparse GEMM, approximate gradient; ``auto`` = transposable when the
#: forward mask is, else dense.
GRAD_INPUT_POLICIES = ("auto", "transposable", "dense", "bimask")
BIMASK_METHODS = ("random", "optimized")
#: ``grad_weight``: ``dense`` = dY.T @ X on a dense GEMM, straight through to the dense weight;
#: ``mvue`` = dY pruned to ``mvue_n:mvue_m`` along the token (reduction) dim by a minimum-variance
#: unbiased stochastic mask, then a sparse GEMM (still straight through to the dense weight);
#: ``fst`` = the activation X pruned n:m along tokens by a FIXED mask plus a gradient shift that
#: restores the dropped tokens' contribution (Fully Sparse Training; needs n to divide m).
GRAD_WEIGHT_POLICIES = ("dense", "mvue", "fst")
#: ``mvue_method``: ``exact`` MVUE, or the cheaper ``approx`` (also unbiased, larger variance;
#: :mod:`nmcompile.solvers.mvue`).
MVUE_METHODS = ("exact", "approx")
#: ``prune``: how the masked weight the sparse GEMMs read is formed from the dense weight.
#: ``hard`` = ``W * mask`` (straight-through estimator; with ``decay``, SR-STE); ``sste`` =
#: S-STE (Hu, Zhu, Chen, NeurIPS 2024): ``beta * S(W)``, every kept entry shrunk by the largest
#: magnitude the mask prunes in its group (continuous in ``W``), times a per-tensor scale
#: ``beta`` fixed at the weight's first sparse step (:mod:`nmcompile.solvers.soft_threshold`).
PRUNE_FUNCTIONS = ("hard", "sste")
#: ``kernels``: ``auto`` = the 2:4 sparse kernel (cuSPARSELt) for each GEMM the cost rule measured
#: right and faster on this GPU, dense elsewhere; ``sparse`` = the sparse kernel for every GEMM
#: its contract allows (no timing, no self-check); ``emulate`` = masked-dense everywhere.
KERNEL_POLICIES = ("auto", "sparse", "emulate")
#: ``mode``: Inductor's compile modes, as ``torch.compile(mode=...)`` names them.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: ``adapters``: PEFT adapter weights (LoRA's ``lora_A``/``lora_B``, ...): ``dense`` leaves them
#: dense (low rank: no sparse speed-up, and a mask halves the adapter's capacity); ``sparse``
#: lets the layer filter's other rules decide, as for any weight.
ADAPTER_POLICIES = ("dense", "sparse")

_ENV_DUMP_DIR = "NMCOMPILE_DUMP_DIR"
#: Parameter-name patterns left dense by default: embeddings and language-model heads (tied
#: or not), which papers and peers keep dense.
DEFAULT_EXCLUDE = ("*embed*", "*wte*", "*wpe*", "*lm_head*")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class NMConfig:
    """Settings of ``torch.compile(model, backend="nm", options=...)``.

    Attributes:
        n, m: at most ``n`` non-zeros in every ``m`` consecutive elements (default 2:4).
        forward: forward-mask policy, one of :data:`FORWARD_POLICIES`.
        transposable_method: solver of transposable masks, one of :data:`TRANSPOSABLE_METHODS`.
        grad_input: grad-input policy, one of :data:`GRAD_INPUT_POLICIES`.
        bimask_candidates, bimask_method: permutation search budget and method of
            ``grad_input="bimask"`` (``optimized`` keeps at least as much as ``random``).
        mask_interval: optimizer steps between mask refreshes (1 = every step). A step is
            seen as a change of the weights; micro-steps of gradient accumulation reuse the
            mask. Above 1, or with a solver that cannot run in the graph, masks are computed
            outside the graph and handed to it as inputs.
        grad_weight: grad-weight policy, one of :data:`GRAD_WEIGHT_POLICIES`.
        mvue_n, mvue_m: the ratio ``grad_weight="mvue"`` prunes dY to (any ``0 < mvue_n <
            mvue_m <= 8``; 1:2 and 2:4 run on the 2:4 sparse kernel, like 1:4 and 2:8).
        mvue_method: one of :data:`MVUE_METHODS`.
        decay: masked decay (SR-STE) ``alpha``: the backward graph adds
            ``alpha * (1 - mask) * W`` to each masked weight's gradient; 0 disables it.
        prune: one of :data:`PRUNE_FUNCTIONS`: ``hard`` (``W * mask``) or ``sste``
            (S-STE's soft threshold and fixed per-tensor scale, in place of ``W * mask``
            wherever the graph reads the weight; forward ``rowwise`` with ``grad_input``
            ``dense`` is the paper's form).
        min_numel: weights with fewer elements stay dense (semi-structured kernels need at
            least a 16 x 16 sparse operand).
        include: ``fnmatch`` patterns of parameter names to sparsify (``None``: all).
        exclude: patterns of parameter names to leave dense (default :data:`DEFAULT_EXCLUDE`);
            giving it REPLACES the defaults.
        extra_exclude: more patterns to leave dense, ADDED to ``exclude`` (the defaults
            included): ``extra_exclude=["*classifier*"]`` keeps embeddings and heads dense too.
        adapters: PEFT adapter weights, one of :data:`ADAPTER_POLICIES` (default ``dense``;
            :mod:`nmcompile.integrations.peft` says which weights are adapters).
        param_filter: optional predicate ``(name, param) -> bool`` applied after the patterns.
        dump_dir: folder for graph dumps and the per-matmul table; ``None`` reads
            ``NMCOMPILE_DUMP_DIR`` (unset: no dump).
        inductor: ``True`` hands the rewritten graphs to Inductor; ``False`` runs them as
            plain FX graphs (AOTAutograd only: much faster to compile, same numbers).
        kernels: which kernel runs the sparse GEMMs, one of :data:`KERNEL_POLICIES`
            (:mod:`nmcompile.kernels`).
        mode: Inductor's compile mode, one of :data:`MODES` (``torch.compile(mode=...)`` sets
            it too, when no ``options`` are given): ``reduce-overhead`` captures the compiled
            graphs in CUDA graphs, ``max-autotune`` also tunes Inductor's kernels.
        micro_steps: calls of the compiled module per optimizer step (gradient accumulation)
            that ``kernels="auto"``'s cost rule assumes: a weight's compressed copies are made
            once per optimizer step, so their cost is shared by this many GEMM calls
            (:mod:`nmcompile.kernels.cost`).
        sparse_start: optimizer steps of dense training before the sparse phase (0: sparse from
            the start); see :mod:`nmcompile.schedule`.
        sparse_stop: the optimizer step from which training is dense again, after the masked
            weights are pruned in place (``None``: sparse to the end).
    """

    n: int = 2
    m: int = 4
    forward: str = "auto"
    transposable_method: str = "auto"
    grad_input: str = "auto"
    bimask_candidates: int = 16
    bimask_method: str = "optimized"
    mask_interval: int = 1
    grad_weight: str = "dense"
    mvue_n: int = 2
    mvue_m: int = 4
    mvue_method: str = "exact"
    decay: float = 0.0
    prune: str = "hard"
    min_numel: int = 256
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    extra_exclude: tuple[str, ...] = ()
    adapters: str = "dense"
    param_filter: Callable[[str, Any], bool] | None = None
    dump_dir: str | None = None
    inductor: bool = True
    kernels: str = "auto"
    mode: str = "default"
    micro_steps: int = 1
    sparse_start: int = 0
    sparse_stop: int | None = None

    def __post_init__(self) -> None:
        for key in ("n", "m", "mvue_n", "mvue_m", "min_numel", "bimask_candidates",
                    "mask_interval", "micro_steps"):
            if not _is_int(getattr(self, key)):
                raise ValueError(f"NMConfig.{key} must be an int, got {getattr(self, key)!r}")
        if not 0 < self.n < self.m:
            raise ValueError(f"NMConfig.n and .m need 0 < n < m, got n={self.n}, m={self.m}")
        if self.min_numel < 0:
            raise ValueError(f"NMConfig.min_numel must be >= 0, got {self.min_numel}")
        for key in ("bimask_candidates", "mask_interval", "micro_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"NMConfig.{key} must be >= 1, got {getattr(self, key)}")
        for key, choices in (
            ("forward", FORWARD_POLICIES),
            ("transposable_method", TRANSPOSABLE_METHODS),
            ("grad_input", GRAD_INPUT_POLICIES),
            ("bimask_method", BIMASK_METHODS),
            ("grad_weight", GRAD_WEIGHT_POLICIES),
            ("mvue_method", MVUE_METHODS),
            ("prune", PRUNE_FUNCTIONS),
            ("kernels", KERNEL_POLICIES),
            ("mode", MODES),
            ("adapters", ADAPTER_POLICIES),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(
                    f"NMConfig.{key}={getattr(self, key)!r} is not one of {', '.join(choices)}"
                )
        if not 0 < self.mvue_n < self.mvue_m <= MVUE_MAX_M:
            raise ValueError(
                f"NMConfig.mvue_n:mvue_m={self.mvue_n}:{self.mvue_m} is not supported; "
                f"MVUE gradient pruning needs 0 < mvue_n < mvue_m <= {MVUE_MAX_M}"
            )
        if self.grad_weight == "fst" and self.m % self.n:
            raise ValueError(
                f"NMConfig.grad_weight='fst' keeps every (m // n)-th token and needs n to divide "
                f"m, got {self.n}:{self.m}"
            )
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not (
            0 <= self.decay < float("inf")
        ):
            raise ValueError(f"NMConfig.decay must be a finite float >= 0, got {self.decay!r}")
        for key in ("include", "exclude", "extra_exclude"):
            value = getattr(self, key)
            if isinstance(value, str) or (value is not None and not all(
                    isinstance(v, str) for v in value)):
                raise ValueError(f"NMConfig.{key} must be a sequence of name patterns, got "
                                 f"{value!r}")
            if value is not None:
                object.__setattr__(self, key, tuple(value))
        if self.param_filter is not None and not callable(self.param_filter):
            raise ValueError(f"NMConfig.param_filter must be callable, got {self.param_filter!r}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"NMConfig.dump_dir must be a path or None, got {self.dump_dir!r}")
        if not isinstance(self.inductor, bool):
            raise ValueError(f"NMConfig.inductor must be a bool, got {self.inductor!r}")
        if not _is_int(self.sparse_start) or self.sparse_start < 0:
            raise ValueError(f"NMConfig.sparse_start must be an int >= 0 (optimizer steps), got "
                             f"{self.sparse_start!r}")
        if self.sparse_stop is not None and (not _is_int(self.sparse_stop)
                                             or self.sparse_stop <= self.sparse_start):
            raise ValueError(f"NMConfig.sparse_stop must be None or an int > sparse_start="
                             f"{self.sparse_start} (optimizer steps), got {self.sparse_stop!r}")
        if self.mode != "default" and not self.inductor:
            raise ValueError(
                f"NMConfig.mode={self.mode!r} is an Inductor mode and needs inductor=True")
        if self.transposable_method == "patterns" and self.m > MAX_PATTERN_M:
            raise ValueError(
                f"NMConfig.transposable_method='patterns' enumerates tiles for m <= "
                f"{MAX_PATTERN_M}, got {self.n}:{self.m}; use 'mcf', 'greedy' or 'auto'"
            )
        if self.grad_input == "bimask" and self.forward == "transposable":
            raise ValueError(
                "NMConfig.grad_input='bimask' pairs a separate backward mask with a row-wise "
                "forward mask; use forward='rowwise' (or 'auto') with it"
            )
        if self.prune == "sste" and self.grad_input == "bimask":
            raise ValueError(
                "NMConfig.prune='sste' forms one soft-thresholded weight from the forward mask; "
                "Bi-Mask's separate backward mask is not supported with it (use "
                "grad_input='dense' or 'transposable', or prune='hard')")
        if self.grad_input == "transposable" and self.forward_policy != "transposable":
            raise ValueError(
                "NMConfig.grad_input='transposable' reuses the forward mask, which needs "
                f"forward='transposable' (got forward={self.forward!r}); use grad_input='dense'"
            )

    @property
    def forward_policy(self) -> str:
        """``forward`` with ``auto`` resolved."""
        if self.forward != "auto":
            return self.forward
        if self.grad_input == "bimask" or self.m > MAX_PATTERN_M:
            return "rowwise"  # min-cost flow for m > 4 is opt-in: it runs outside the graph
        return "transposable"

    @property
    def scheduled(self) -> bool:
        """Whether training has a dense phase (``sparse_start > 0`` or a ``sparse_stop``)."""
        return self.sparse_start > 0 or self.sparse_stop is not None

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether ``mode`` captures the compiled graphs in CUDA graphs."""
        return self.mode in ("reduce-overhead", "max-autotune")

    @property
    def grad_input_policy(self) -> str:
        """``grad_input`` with ``auto`` resolved."""
        if self.grad_input != "auto":
            return self.grad_input
        return "transposable" if self.forward_policy == "transposable" else "dense"

    def excludes(self, name: str, param: Any, aliases: Sequence[str] = ()) -> str | None:
        """Why the layer filter leaves parameter ``name`` dense, or ``None`` if it does not.

        ``name`` is the parameter's ``named_parameters()`` name; ``aliases`` its other names
        (a tied weight's, from ``named_parameters(remove_duplicate=False)``). ``include``,
        ``exclude`` and ``extra_exclude`` patterns match any of them (excluding a tied LM head
        excludes the one tensor it shares with the embedding); then PEFT adapter weights are
        left dense (``adapters="dense"``); ``param_filter`` gets ``name``.
        """
        names = (name, *aliases)
        if self.include is not None and not any(
                fnmatch.fnmatch(n, p) for n in names for p in self.include):
            return f"not matched by include={list(self.include)}"
        for n in names:
            hit = next((p for p in (*self.exclude, *self.extra_exclude)
                        if fnmatch.fnmatch(n, p)), None)
            if hit is not None:
                return f"excluded by pattern {hit!r}" + (f" (as {n})" if n != name else "")
        if self.adapters == "dense":
            adapter = adapter_layer(name)
            if adapter is not None:
                return (f"PEFT adapter weight ({adapter}): adapters stay dense "
                        "(options adapters='sparse' masks them)")
        if self.param_filter is not None and not self.param_filter(name, param):
            return "rejected by param_filter"
        return None

    @property
    def transposable_method_resolved(self) -> str:
        """``transposable_method`` with ``auto`` resolved."""
        if self.transposable_method != "auto":
            return self.transposable_method
        return "patterns" if self.m <= MAX_PATTERN_M else "mcf"

    @property
    def masks_outside_graph(self) -> bool:
        """Whether masks are solved outside the graph and passed in as graph inputs."""
        return (
            self.mask_interval > 1
            or self.grad_input == "bimask"
            or (self.forward_policy == "transposable"
                and self.transposable_method_resolved != "patterns")
        )

    def resolved(self) -> NMConfig:
        """A copy with ``auto`` policies and the dump folder resolved (what actually runs)."""
        dump_dir = self.dump_dir if self.dump_dir is not None else os.environ.get(_ENV_DUMP_DIR)
        return dataclasses.replace(
            self,
            forward=self.forward_policy,
            transposable_method=self.transposable_method_resolved,
            grad_input=self.grad_input_policy,
            dump_dir=os.fspath(dump_dir) if dump_dir else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-friendly: a ``param_filter`` is shown by name)."""
        fields = dataclasses.asdict(self)
        if self.param_filter is not None:
            fields["param_filter"] = getattr(self.param_filter, "__qualname__",
                                             repr(self.param_filter))
        return fields

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> NMConfig:
        """Build the resolved config from ``torch.compile(..., options=...)``.

        ``options`` holds NMConfig field names, or ``{"config": NMConfig(...)}`` optionally with
        field overrides. Unknown keys raise ``ValueError`` listing the valid ones.
        """
        options = dict(options or {})
        base = options.pop("config", None) or cls()
        if not isinstance(base, cls):
            raise ValueError(f"options['config'] must be an nmcompile.NMConfig, got {base!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown nm backend option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: config, {', '.join(valid)}"
            )
        return dataclasses.replace(base, **options).resolved()
