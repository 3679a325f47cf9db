"""A fake cuSPARSELt shared library for the cached-plan path's Python side on CPU
(:mod:`nmcompile.kernels.cusparselt_plans`), computing on CPU memory through raw addresses.

It has the C functions :data:`nmcompile.kernels.cusparselt_lib.SIGNATURES` names, takes what
ctypes would pass (ints for pointers, enums and sizes; ``None`` for a null pointer) and is
strict where the real library is: a call with the wrong number of arguments, a non-int
argument, an unknown or destroyed object, a handle never initialised, a misaligned pointer, a
leading dimension that does not fit, an operand or a bias in another dtype than declared all
return an error status (and are recorded in ``errors``). ``cusparseLtMatmul`` reads ``A`` (a
blob of the CPU model of ``torch._cslt_compress``, :mod:`tests.cslt_model`), ``B``, the bias and
alpha/beta from their addresses as its descriptors declare them and writes ``D`` there, in fp32
accumulation rounded to the declared dtype. The plan reads the matmul descriptor when it runs
(a bias pointer set after the plan was made is used), as torch's own plan cache assumes.

``fault`` injects one misbehaviour: ``"wrong_layout"`` (``B`` read as if never transposed),
``"stale_bias"`` (the bias pointer the plan was made with is used), ``"plan_init"`` (plan
creation fails) or ``"matmul"`` (every matmul fails).
"""

from __future__ import annotations

import ctypes
from collections import Counter

import torch

from nmcompile.kernels import cusparselt_lib as lt

_DTYPES = {code: dtype for dtype, code in lt.DATA_TYPES.items()}
ERROR = 3  # CUSPARSE_STATUS_INVALID_VALUE
#: workspace bytes every plan asks for (the path must hand a workspace in)
WORKSPACE = 256


class FakeError(Exception):
    pass


def tensor_at(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``prod(shape)`` elements of CPU memory at ``address`` (shares it)."""
    numel = 1
    for s in shape:
        numel *= s
    raw = (ctypes.c_uint8 * (numel * dtype.itemsize)).from_address(address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)


class FakeCusparseLt:
    """The fake library. ``calls`` counts calls per function; ``log`` lists ``(name, args)``;
    ``errors`` the refusals; ``model``: the CPU model whose blobs ``A`` holds."""

    def __init__(self, model, fault: str | None = None) -> None:
        self.model, self.fault = model, fault
        self.calls: Counter[str] = Counter()
        self.log: list[tuple[str, tuple]] = []
        self.errors: list[str] = []
        self.handles: set[int] = set()
        self.descs: dict[int, dict] = {}
        self.matmuls: dict[int, dict] = {}
        self.algs: dict[int, dict] = {}
        self.plans: dict[int, dict] = {}
        for name, argtypes in {**lt.SIGNATURES, **lt.OPTIONAL}.items():
            setattr(self, name, self._entry(name, len(argtypes)))

    def _entry(self, name: str, arity: int):
        impl = getattr(self, "_" + name.removeprefix("cusparseLt"))

        def call(*args):
            self.calls[name] += 1
            self.log.append((name, args))
            try:
                if len(args) != arity:
                    raise FakeError(f"{name}: {len(args)} arguments, the header has {arity}")
                if not all(a is None or (isinstance(a, int) and not isinstance(a, bool))
                           for a in args):
                    raise FakeError(f"{name}: non-int argument in {args!r}")
                impl(*args)
            except FakeError as error:
                self.errors.append(str(error))
                return ERROR
            return 0

        return call

    # -- helpers ----------------------------------------------------------------------------
    def _handle(self, h):
        if h not in self.handles:
            raise FakeError(f"handle {h} was not initialised")

    @staticmethod
    def _aligned(address, what):
        if address is None or address % lt.ALIGNMENT:
            raise FakeError(f"{what} at {address} is not {lt.ALIGNMENT}-byte aligned")

    def _new(self, table, address, what, **fields):
        self._aligned(address, what)
        if address in self.descs or address in self.matmuls or address in self.algs or (
                address in self.plans):
            raise FakeError(f"{what} at {address} is already in use")
        table[address] = fields

    def _get(self, table, address, what):
        if address not in table:
            raise FakeError(f"unknown or destroyed {what} at {address}")
        return table[address]

    # -- the library ----------------------------------------------------------------------------
    def _Init(self, h):
        self._aligned(h, "handle")
        self.handles.add(h)

    def _GetProperty(self, prop, out):
        ctypes.c_int.from_address(out).value = {0: 0, 1: 8, 2: 0}[prop]

    def _DenseDescriptorInit(self, h, d, rows, cols, ld, alignment, dtype, order):
        self._handle(h)
        if dtype not in _DTYPES or order not in (lt.ORDER_ROW, lt.ORDER_COL) or alignment != 16:
            raise FakeError(f"dense descriptor: dtype {dtype}, order {order}, align {alignment}")
        if ld < (cols if order == lt.ORDER_ROW else rows) or min(rows, cols) < 1:
            raise FakeError(f"dense descriptor {rows}x{cols} with ld {ld}")
        self._new(self.descs, d, "descriptor", kind="dense", rows=rows, cols=cols, ld=ld,
                  dtype=_DTYPES[dtype], order=order)

    def _StructuredDescriptorInit(self, h, d, rows, cols, ld, alignment, dtype, order, sparsity):
        self._handle(h)
        if (dtype not in _DTYPES or order != lt.ORDER_ROW or ld != cols or alignment != 16
                or sparsity != lt.SPARSITY_50_PERCENT):
            raise FakeError("structured descriptor: only row-major, tight, 50%")
        self._new(self.descs, d, "descriptor", kind="structured", rows=rows, cols=cols, ld=ld,
                  dtype=_DTYPES[dtype], order=order)

    def _MatDescriptorDestroy(self, d):
        self._get(self.descs, d, "descriptor")
        del self.descs[d]

    def _MatmulDescriptorInit(self, h, mm, op_a, op_b, a, b, c, d, compute):
        self._handle(h)
        da, db, dc, dd = (self._get(self.descs, x, "descriptor") for x in (a, b, c, d))
        if op_a != lt.OPERATION_NON_TRANSPOSE or compute != lt.COMPUTE_32F or da["kind"] != (
                "structured"):
            raise FakeError("matmul descriptor: A must be structured, non-transposed, fp32")
        k, n = (db["cols"], db["rows"]) if op_b == lt.OPERATION_TRANSPOSE else (db["rows"],
                                                                                db["cols"])
        if da["cols"] != k or (dd["rows"], dd["cols"]) != (da["rows"], n) or dc != dd:
            raise FakeError(f"matmul descriptor: shapes {da} {db} {dd} do not chain")
        self.matmuls.pop(mm, None)  # the API has no destroy for it: its memory is reused
        self._new(self.matmuls, mm, "matmul", op_b=op_b, a=a, b=b, d=d, bias=None)

    def _MatmulDescSetAttribute(self, h, mm, attribute, data, size):
        self._handle(h)
        desc = self._get(self.matmuls, mm, "matmul")
        if attribute != lt.BIAS_POINTER or size != 8:
            raise FakeError(f"matmul attribute {attribute} of {size} bytes")
        desc["bias"] = ctypes.c_void_p.from_address(data).value

    def _MatmulAlgSelectionInit(self, h, alg, mm, which):
        self._handle(h)
        self._get(self.matmuls, mm, "matmul")
        if which != lt.ALG_DEFAULT:
            raise FakeError("algorithm selection: only the default")
        self._new(self.algs, alg, "algorithm selection", matmul=mm, alg_id=0)

    def _MatmulAlgSelectionDestroy(self, alg):
        self._get(self.algs, alg, "algorithm selection")
        del self.algs[alg]

    def _MatmulAlgSetAttribute(self, h, alg, attribute, data, size):
        self._handle(h)
        if attribute != lt.ALG_CONFIG_ID or size != 4:
            raise FakeError(f"algorithm attribute {attribute} of {size} bytes")
        self._get(self.algs, alg, "algorithm selection")["alg_id"] = ctypes.c_int.from_address(
            data).value

    def _MatmulPlanInit(self, h, plan, mm, alg):
        self._handle(h)
        desc, sel = self._get(self.matmuls, mm, "matmul"), self._get(self.algs, alg, "alg")
        if self.fault == "plan_init":
            raise FakeError("plan init fails (injected)")
        if sel["matmul"] != mm:
            raise FakeError("plan: the algorithm selection belongs to another matmul")
        self._new(self.plans, plan, "plan", matmul=mm, alg_id=sel["alg_id"], bias=desc["bias"])

    def _MatmulGetWorkspace(self, h, plan, out):
        self._handle(h)
        self._get(self.plans, plan, "plan")
        ctypes.c_size_t.from_address(out).value = WORKSPACE

    def _MatmulPlanDestroy(self, plan):
        self._get(self.plans, plan, "plan")
        del self.plans[plan]

    def _SpMMACompressedSize2(self, h, d, size, buffer_size):
        self._handle(h)
        desc = self._get(self.descs, d, "descriptor")
        ctypes.c_size_t.from_address(size).value = (
            desc["rows"] * desc["cols"] * 9 // 16 * desc["dtype"].itemsize)
        ctypes.c_size_t.from_address(buffer_size).value = 0

    def _Matmul(self, h, plan, alpha, a, b, beta, c, d, workspace, streams, num_streams):
        self._handle(h)
        p = self._get(self.plans, plan, "plan")
        mm = self.matmuls[p["matmul"]]
        da, db, dd = self.descs[mm["a"]], self.descs[mm["b"]], self.descs[mm["d"]]
        if self.fault == "matmul":
            raise FakeError("matmul fails (injected)")
        if (ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value) != (
                1.0, 0.0) or num_streams != 1 or c != d or workspace is None:
            raise FakeError("matmul: alpha 1, beta 0, C = D, one stream and a workspace expected")
        ctypes.c_void_p.from_address(streams).value  # noqa: B018  (the stream array is read)
        for address, what in ((a, "A"), (b, "B"), (d, "D"), (workspace, "workspace")):
            self._aligned(address, what)
        m, k = da["rows"], da["cols"]
        blob = tensor_at(a, (m, 9 * k // 16), da["dtype"])
        dense_a = self.model.decode(blob.clone(), k).float()
        b_mem = tensor_at(b, (db["rows"], db["ld"]), db["dtype"])[:, :db["cols"]].float()
        transposed = mm["op_b"] == lt.OPERATION_TRANSPOSE and self.fault != "wrong_layout"
        dense_b = b_mem.t() if transposed else b_mem.reshape(k, -1)
        out = dense_a @ dense_b
        bias_ptr = p["bias"] if self.fault == "stale_bias" else mm["bias"]
        if bias_ptr is not None:
            self._aligned(bias_ptr, "bias")
            out = out + tensor_at(bias_ptr, (m,), dd["dtype"]).float()[:, None]
        if dd["order"] == lt.ORDER_COL:  # [n, ld] rows of memory hold D's columns
            tensor_at(d, (dd["cols"], dd["ld"]), dd["dtype"])[:, :m].copy_(out.t())
        else:
            tensor_at(d, (m, dd["ld"]), dd["dtype"])[:, :dd["cols"]].copy_(out)
