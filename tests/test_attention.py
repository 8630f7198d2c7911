"""Attention kernels (forward, dq/dk/dv, packed qkv) and the drop-in module, against float64 math.

Without a GPU the Triton kernels run under the interpreter (fp32 and fp16: bf16 dots are wrong
there); GPU tests add bf16, long sequences, B*H > 65,535, cuda:1, torch.compile. fp32 inputs use exact
fp32 dots (input_precision="ieee") on both, so fp32 is held to the fp32 bound against torch in full fp32.
"""
import pytest
import torch

import sm90
import vit_fast.functional as VF
from numerics import DTYPE_BOUND, rel_err
from opnumerics import (PATHS, check_close, check_compiled, check_op_paths, compare_to_float64, float64_gradcheck,
                        module_fn, require_interpreter, require_kernel_path, rounding_floors, select_path)
from vit_fast import dispatch, reference
from vit_fast.kernels import attention as kernels
from vit_fast.nn import Attention

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def poison_empty():
    """torch.empty / empty_like return NaN-filled memory, so elements a kernel leaves unwritten fail."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(was)


def launches(op):
    return dispatch.kernel_launches[op]


def make_qkv(B, H, n_q, n_kv, D, dtype, device, std=1.0):
    q = torch.randn(B, H, n_q, D, device=device, dtype=dtype) * std
    k = torch.randn(B, H, n_kv, D, device=device, dtype=dtype) * std
    v = torch.randn(B, H, n_kv, D, device=device, dtype=dtype)
    return q, k, v


def check_attention(name, out, grads, fn, inputs, do, dtype, device, key_count):
    """Kernel output and grads vs float64 (bound) and vs torch in the same dtype (2x fwd, 3x bwd,
    + the fp32 rounding floor: opnumerics)."""
    results = compare_to_float64([f"{name} out", f"{name} dq", f"{name} dk", f"{name} dv"], None, fn, fn,
                                 list(inputs), [do], bound=DTYPE_BOUND[dtype], ours=((out,), list(grads)),
                                 exclude=_one_key_exclusions(name, key_count))
    if key_count == 1:
        # one key: softmax is constant 1, so dq = dk = 0; what is left is rounding in dO.V - delta,
        # relative to the size of the terms that cancel
        q, k, v = (t.double() for t in inputs)
        cancelling = do.double().norm() * v.norm() * max(q.norm(), k.norm())
        for g_name in ("dq", "dk"):
            g = results[f"{name} {g_name}"][0]
            assert g.double().norm() <= DTYPE_BOUND[dtype] * cancelling, f"{name} {g_name}: {g.norm():.2e} not ~0"


def _one_key_exclusions(name, key_count):
    return (f"{name} dq", f"{name} dk") if key_count == 1 else ()


# ----------------------------------------------------------------------------- kernels (launchers)

# B, H, N_Q, N_KV, D: N = 1; ragged 197 / 257; head dims in two column chunks (80 = 64 + 16,
# 48 = 32 + 16, 72 = 64 + 16 with the tail masked) and in one padded chunk (100 -> 128); cross
# attention with whole query blocks and a ragged key block
SHAPES = [
    (1, 1, 1, 1, 32),
    (2, 2, 197, 197, 64),
    (2, 2, 257, 257, 80),
    (1, 2, 197, 197, 128),
    (1, 1, 128, 70, 48),
    (1, 2, 65, 40, 72),
    (1, 1, 33, 17, 100),
]


def single_pass_cfgs(n_kv):
    """One key block of the next power of two >= N_KV (at least 16): valid for single pass by construction."""
    return kernels.Config(32, max(16, 1 << (n_kv - 1).bit_length()), 4, 1), None


# the largest key block test_kernels_vs_reference's single-pass config may take on a GPU: a 256- or
# 512-key block at D up to 128 needs more shared memory than an H100 has (OutOfResources);
# test_gpu_single_pass_backward covers N = 197 and 256 with the sweep's 16-bit candidates
GPU_SINGLE_PASS_MAX_KEYS = 128


@pytest.mark.parametrize("bwd", ["two-pass", "single-pass"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_kernels_vs_reference(dtype, shape, bwd, device):
    """The launchers on NaN-poisoned outputs: o, lse, dq, dk, dv all written and right."""
    if device == "cpu" and dtype == torch.float16 and bwd == "single-pass" and shape[2] > 200:
        pytest.skip("interpreter time: fp16 single pass is covered at the smaller shapes")
    if device != "cpu" and bwd == "single-pass" and shape[3] > GPU_SINGLE_PASS_MAX_KEYS:
        pytest.skip("a single key block this wide does not fit in shared memory; see test_gpu_single_pass_backward")
    B, H, n_q, n_kv, D = shape
    q, k, v = make_qkv(B, H, n_q, n_kv, D, dtype, device)
    do = torch.randn(B, H, n_q, D, device=device, dtype=dtype)
    scale = D**-0.5
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, n_q), float("nan"), device=device)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    kernels.attention_fwd(q, k, v, o, lse, scale)
    kernels.attention_bwd(do, q, k, v, o, lse, dq, dk, dv, scale,
                          single_pass_cfgs(n_kv) if bwd == "single-pass" else None)

    # 16-bit products are exact in fp32 and fp32 dots are exact fp32 (ieee), so lse is fp32-accurate
    ref_lse = torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)
    assert rel_err(lse, ref_lse) <= DTYPE_BOUND[torch.float32]
    check_attention("attention", o, (dq, dk, dv), reference.attention, (q, k, v), do, dtype, device, n_kv)


def test_single_pass_chosen_only_where_one_key_block_covers_n_kv(monkeypatch):
    single = kernels.Config(32, 256, 8, 3)
    monkeypatch.setitem(kernels.SINGLE_PASS_CONFIGS, 64, single)
    assert kernels.bwd_configs(64, 256, torch.bfloat16) == (single, None)
    assert kernels.bwd_configs(64, 257, torch.bfloat16) == (kernels.config("dkdv", 64, torch.bfloat16),
                                                            kernels.config("dq", 64, torch.bfloat16))
    assert kernels.bwd_configs(64, 197, torch.float32)[1] is not None  # 16-bit inputs only


def test_single_pass_rejects_too_few_keys_per_block(device):
    q, k, v = make_qkv(1, 1, 40, 40, 32, torch.float32, device)
    o, lse = torch.empty_like(q), torch.empty(1, 1, 40, device=device)
    with pytest.raises(ValueError, match="single-pass backward needs block_n >= N_KV"):
        kernels.attention_bwd(o, q, k, v, o, lse, q.clone(), k.clone(), v.clone(), 1.0,
                              (kernels.Config(16, 32, 4, 1), None))




@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every 16-bit table entry (forward, dQ, dK/dV), at one-chunk and two-chunk head dims, compiles
    for sm_90 with this Triton, no GPU needed, fits an H100's shared memory and keeps its tiles in
    registers (no local-memory stack); the ROPE builds (EVA-02's rotary embedding) at D = 64 and 80
    compile too, D = 64 without spills (ROPE_CONFIGS). (The fp32 "ieee" entries do spill: benchmarks/NOTES.md.)"""
    out = sm90.run_script(sm90.script("attention"), tmp_path)
    assert out.count("registers") == 3 * 7  # 3 kernels x HEAD_DIMS
    assert out.count("rope ") == 3 * 2  # the ROPE builds: 3 kernels x D = 64 (no spills), 80 (spills printed)


# ----------------------------------------------------------------------------- public ops


def packed_views(B, N, H, D, dtype, device):
    """q, k, v as strided [B, H, N, D] views of one [B, N, 3, H, D] leaf buffer."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)


LAYOUTS = ["packed-views", "bnhd-transposed", "head-dim-slices"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_attention_strided_views(dtype, layout, device, poison_empty):
    """q, k, v read through strides (no copies); grads flow back to the viewed leaves."""
    B, H, N, D = 2, 2, 197, 64
    if layout == "packed-views":
        leaf, (q, k, v) = packed_views(B, N, H, D, dtype, device)
        leaves = [leaf]
    elif layout == "bnhd-transposed":
        leaves = [torch.randn(B, N, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        q, k, v = (t.transpose(1, 2) for t in leaves)
    else:  # row stride 96 inside a wider buffer
        leaves = [torch.randn(B, H, N, 96, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        q, k, v = (t[..., 16:16 + D] for t in leaves)
    assert q.stride(-1) == 1 and not q.is_contiguous()
    before = launches("attention_fwd"), launches("attention_bwd")
    out = VF.attention(q, k, v)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    if dispatch.use_kernels(q):
        assert (launches("attention_fwd"), launches("attention_bwd")) == (before[0] + 1, before[1] + 1)
    check_attention(f"attention {layout}", out, grads, reference.attention, (q, k, v), do, dtype, device, N)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_attention_large_logits(dtype, device, poison_empty):
    """scale * |q.k| up to ~100: the online softmax stays finite and as exact as torch in the same dtype."""
    q, k, v = make_qkv(1, 2, 197, 197, 64, dtype, device, std=4.0)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 64**-0.5
    q = (q.double() * (100 / logits.abs().max())).to(dtype)  # the largest logit is 100 whatever the draw
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    logits = (q.double() @ k.double().transpose(-1, -2)) * 64**-0.5
    assert logits.abs().max() > 80
    out = VF.attention(q, k, v)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    check_attention("attention large logits", out, grads, reference.attention, (q, k, v), do, dtype, device, 197)


def test_attention_scale_and_defaults(device, poison_empty):
    q, k, v = make_qkv(1, 2, 33, 33, 32, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for scale in (None, 0.05, -0.3):
        out = VF.attention(q, k, v, scale=scale)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
        fn = lambda a, b, c: reference.attention(a, b, c, scale)  # noqa: E731
        check_attention(f"attention scale={scale}", out, grads, fn, (q, k, v), do, torch.float32, device, 33)


def test_attention_expanded_upstream_gradient(device):
    """out.sum() hands back a stride-0 gradient; the backward still runs (and matches)."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 20, 20, 32, torch.float32, device))
    VF.attention(q, k, v).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.attention(qd, kd, vd).sum().backward()
    for t, r in ((q, qd), (k, kd), (v, vd)):
        assert rel_err(t.grad, r.grad) <= 1e-5


EMPTY_CASES = [("attention", (0, 2, 197, 64)), ("attention", (2, 0, 33, 32)), ("attention_packed", (0, 197, 3 * 2 * 64))]


@pytest.mark.parametrize("op,shape", EMPTY_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_on_every_path(device, monkeypatch, path, op, shape):
    """B = 0 (or H = 0): an empty result of the right shape and dtype, and empty gradients, on the
    kernel path and both PyTorch paths (the packed PyTorch path once failed to reshape it)."""
    device = select_path(path, monkeypatch, device)
    before = dispatch.kernel_launches.copy()
    if op == "attention":
        q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
        out = VF.attention(q, k, v)
        assert out.shape == shape and out.dtype == torch.float32
        out.sum().backward()
        leaves = (q, k, v)
    else:
        qkv = torch.randn(shape, device=device, requires_grad=True)
        out = VF.attention_packed(qkv, 2)
        assert out.shape == (shape[0], shape[1], shape[2] // 3) and out.dtype == torch.float32
        out.sum().backward()
        leaves = (qkv,)
    for t in leaves:
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype
    if path == "kernel":
        assert (launches(f"{op}_fwd"), launches(f"{op}_bwd")) == (before[f"{op}_fwd"] + 1, before[f"{op}_bwd"] + 1)
    else:
        assert dispatch.kernel_launches == before


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_attention_packed(dtype, device, poison_empty):
    """qkv [B, N, 3*H*D] -> [B, N, H*D]; the gradient lands in one dqkv buffer (no NaN left)."""
    B, N, H, D = 2, 197, 2, 64
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
    before = launches("attention_packed_fwd"), launches("attention_packed_bwd")
    out = VF.attention_packed(qkv, H)
    assert out.shape == (B, N, H * D) and out.is_contiguous()
    do = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, do)
    if dispatch.use_kernels(qkv):
        assert (launches("attention_packed_fwd"), launches("attention_packed_bwd")) == (before[0] + 1, before[1] + 1)
    packed = lambda t: reference.attention_packed(t, H)  # noqa: E731
    compare_to_float64(["attention_packed out", "attention_packed dqkv"], None, packed, packed, [qkv], [do],
                       ours=((out,), [dqkv]))


def test_attention_packed_reads_a_strided_qkv(device):
    """qkv itself a view (every other token of a bigger buffer): read through its strides."""
    base = torch.randn(1, 40, 3 * 2 * 32, device=device)
    qkv = base[:, ::2]
    out = VF.attention_packed(qkv, 2)
    ref = reference.attention_packed(qkv.double(), 2)
    assert rel_err(out, ref) <= DTYPE_BOUND[torch.float32]


def test_opcheck(device):
    """The custom ops' registration (schema, fake impls, dispatch); their gradients are the Functions'
    (test_function_paths_match, test_torch_compile_holds_the_custom_ops)."""
    q, k, v = make_qkv(1, 2, 17, 17, 32, torch.float32, device)
    torch.library.opcheck(torch.ops.vit_fast.attention_fwd.default, (q, k, v, 0.3))
    o, lse = torch.ops.vit_fast.attention_fwd(q, k, v, 0.3)
    torch.library.opcheck(torch.ops.vit_fast.attention_bwd.default, (torch.randn_like(o), q, k, v, o, lse, 0.3))
    qkv = torch.randn(2, 17, 3 * 2 * 32, device=device)
    torch.library.opcheck(torch.ops.vit_fast.attention_packed_fwd.default, (qkv, 2, 0.3))
    o, lse = torch.ops.vit_fast.attention_packed_fwd(qkv, 2, 0.3)
    torch.library.opcheck(torch.ops.vit_fast.attention_packed_bwd.default, (torch.randn_like(o), qkv, o, lse, 2, 0.3))


def _op_cases(device):
    """(op, public call, inputs, upstream gradient) for each Function: plain, packed, packed with rope."""
    q, k, v = make_qkv(1, 2, 17, 23, 32, torch.float32, device)
    qkv = torch.randn(2, 17, 3 * 2 * 32, device=device)
    sin, cos = rope_tables(16, 32, device)
    return {
        "attention": ("attention", lambda q, k, v: VF.attention(q, k, v, 0.3), [q, k, v], [torch.randn_like(q) * 0.5]),
        "attention_packed": ("attention_packed", lambda t: VF.attention_packed(t, 2, 0.3), [qkv],
                             [torch.randn(2, 17, 64, device=device)]),
        "rope packed": ("attention_packed", lambda t: VF.attention_packed(t, 2, rope=(sin, cos), num_prefix_tokens=1),
                        [qkv], [torch.randn(2, 17, 64, device=device)]),
    }


@pytest.mark.parametrize("case", ["attention", "attention_packed", "rope packed"])
def test_function_paths_match(device, monkeypatch, case):
    """The Function's eager path (launch functions) and its traced path (the custom ops, as under
    torch.compile) run the same bodies: bit-identical outputs and grads, each launching the kernels."""
    op, fn, inputs, grads_out = _op_cases(device)[case]
    check_op_paths(monkeypatch, fn, inputs, grads_out, [f"vit_fast::{op}_fwd", f"vit_fast::{op}_bwd"],
                   [f"{op}_fwd", f"{op}_bwd"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["attention", "attention_packed", "rope packed"])
def test_torch_compile_holds_the_custom_ops(device, case):
    """torch.compile(fullgraph=True, aot_eager) of the public function: the forward graph calls the
    fwd custom op, the backward graph the bwd op, and outputs and gradients are eager's, bit for bit."""
    op, fn, inputs, grads_out = _op_cases(device)[case]
    check_compiled(fn, inputs, grads_out, [f"{op}_fwd"], [f"{op}_bwd"])


def test_torch_path_matches_reference(monkeypatch):
    """VIT_FAST_FORCE_TORCH=1 runs the PyTorch path (SDPA): same math, no kernel launch."""
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    q, k, v = make_qkv(2, 3, 19, 23, 16, torch.float32, "cpu")
    before = launches("attention_fwd"), launches("attention_packed_fwd")
    ref = reference.attention(q.double(), k.double(), v.double(), 0.2)
    assert rel_err(VF.attention(q, k, v, 0.2), ref) <= DTYPE_BOUND[torch.float32]
    qkv = torch.randn(2, 19, 3 * 3 * 16)
    assert rel_err(VF.attention_packed(qkv, 3), reference.attention_packed(qkv.double(), 3)) <= DTYPE_BOUND[torch.float32]
    assert (launches("attention_fwd"), launches("attention_packed_fwd")) == before


def test_expanded_and_transposed_inputs(device, poison_empty):
    """k, v shared across heads as stride-0 expanded views of one [B, 1, N, D] leaf each, q a
    transposed view: read through their strides, and the gradients land in (sum into) the leaves."""
    B, H, N, D = 2, 3, 40, 32
    q_leaf = torch.randn(B, N, H, D, device=device)
    k_leaf, v_leaf = (torch.randn(B, 1, N, D, device=device) for _ in range(2))
    do = torch.randn(B, H, N, D, device=device)

    def views(fn):
        return lambda q, k, v: fn(q.transpose(1, 2), k.expand(B, H, N, D), v.expand(B, H, N, D))

    before = launches("attention_fwd"), launches("attention_bwd")
    compare_to_float64(["out", "dq leaf", "dk leaf", "dv leaf"], views(VF.attention), views(reference.attention),
                       views(reference.attention), [q_leaf, k_leaf, v_leaf], [do])
    if dispatch.use_kernels(q_leaf):
        assert (launches("attention_fwd"), launches("attention_bwd")) == (before[0] + 1, before[1] + 1)


def test_bf16_under_the_interpreter_raises(device):
    """Triton's interpreter computes bf16 tl.dot wrongly (rel err ~1e8): every entry to the attention
    kernels says so instead of returning garbage. (On a GPU bf16 runs: the GPU tests.)"""
    require_interpreter(device)
    q, k, v = (t.bfloat16() for t in make_qkv(1, 2, 17, 17, 32, torch.float32, "cpu"))
    qkv = torch.randn(1, 17, 3 * 2 * 32, dtype=torch.bfloat16)
    match = "bfloat16 under TRITON_INTERPRET=1: Triton's interpreter computes tl.dot on bf16 wrongly"
    for call in (lambda: VF.attention(q, k, v), lambda: VF.attention_packed(qkv, 2),
                 lambda: torch.ops.vit_fast.attention_fwd(q, k, v, 0.3),
                 lambda: torch.ops.vit_fast.attention_packed_fwd(qkv, 2, 0.3),
                 lambda: kernels.attention_fwd(q, k, v, torch.empty_like(q), torch.empty(1, 2, 17), 0.3),
                 lambda: kernels.attention_bwd(q, q, k, v, q, torch.empty(1, 2, 17), q.clone(), k.clone(),
                                               v.clone(), 0.3)):
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.parametrize("path", ["torch-forced", "torch-cpu"])
def test_float64_gradcheck_on_the_torch_path(monkeypatch, path):
    select_path(path, monkeypatch, "cpu")
    q, k, v = make_qkv(2, 2, 5, 7, 8, torch.float32, "cpu")
    before = dispatch.kernel_launches.copy()
    float64_gradcheck(lambda q, k, v: VF.attention(q, k, v, 0.4), [q, k, v])
    float64_gradcheck(lambda t: VF.attention_packed(t, 2), [torch.randn(2, 5, 3 * 2 * 4)])
    assert VF.attention(q.double(), k.double(), v.double()).dtype == torch.float64
    assert dispatch.kernel_launches == before


def test_float64_on_the_kernel_path_names_the_dtype(device):
    require_kernel_path(device)
    q = torch.randn(1, 1, 4, 32, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="q: expected dtype in .* on the kernel path, got float64"):
        VF.attention(q, q, q)
    with pytest.raises(ValueError, match="qkv: expected dtype in .* on the kernel path, got float64"):
        VF.attention_packed(torch.randn(1, 4, 96, device=device, dtype=torch.float64), 2)


def _blockwise_attention_without_rescale(q, k, v, block=32):
    """An online softmax that forgets to rescale the accumulator when the running max grows (the
    classic FlashAttention bug), in fp32 torch ops."""
    scale = q.shape[-1] ** -0.5
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    acc, l_sum = torch.zeros_like(q), torch.zeros(q.shape[:-1], dtype=q.dtype)
    for start in range(0, k.shape[2], block):
        s = (q @ k[:, :, start:start + block].transpose(-1, -2)) * scale
        m = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m[..., None])
        acc, l_sum = acc + p @ v[:, :, start:start + block], l_sum + p.sum(-1)  # no exp(m_old - m) factor
    return acc / l_sum[..., None]


def test_comparison_still_catches_regressions(device):
    """The fp32 floor (opnumerics) does not let real regressions through: a missing online-softmax
    rescale, an injected 1e-3 error, and an injected 5e-6 error (inside the 1e-5 bound, but more
    than 2x torch's error + the floor) each fail the same check the kernel passes."""
    q, k, v = make_qkv(1, 2, 197, 197, 64, torch.float32, "cpu")
    ref = reference.attention(q.double(), k.double(), v.double())
    torch_out = reference.attention(q, k, v)
    (floor,), _ = rounding_floors(reference.attention, [q, k, v])
    good = VF.attention(q.to(device), k.to(device), v.to(device)).cpu()
    check_close("kernel", good, torch_out, ref, DTYPE_BOUND[torch.float32], floor=floor)
    noise = torch.randn_like(ref)
    for name, bad in (("missing rescale", _blockwise_attention_without_rescale(q, k, v)),
                      ("1e-3 error", ref + 1e-3 * noise * ref.norm() / noise.norm()),
                      ("5e-6 error", ref + 5e-6 * noise * ref.norm() / noise.norm())):
        with pytest.raises(AssertionError):
            check_close(name, bad, torch_out, ref, DTYPE_BOUND[torch.float32], floor=floor)
    assert rel_err(ref + 5e-6 * noise * ref.norm() / noise.norm(), ref) < DTYPE_BOUND[torch.float32]


def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_INPUTS = [
    ("q not a tensor", lambda: VF.attention([1.0], _q(1, 1, 4, 32), _q(1, 1, 4, 32)), TypeError, "q: expected a torch.Tensor"),
    ("q rank 3", lambda: VF.attention(_q(1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32)), ValueError, "q: expected a 4-D"),
    ("k rank 5", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 1, 4, 32), _q(1, 1, 4, 32)), ValueError, "k: expected a 4-D"),
    ("q int dtype", lambda: VF.attention(torch.ones(1, 1, 4, 32, dtype=torch.int32), _q(1, 1, 4, 32), _q(1, 1, 4, 32)),
     ValueError, "q: expected dtype in"),
    ("k dtype", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32, dtype=torch.float16), _q(1, 1, 4, 32)),
     ValueError, "k: expected dtype torch.float32"),
    ("v device", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), torch.empty(1, 1, 4, 32, device="meta")),
     RuntimeError, "v: expected device cpu"),
    ("k heads", lambda: VF.attention(_q(1, 2, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32)), ValueError, "k: expected shape"),
    ("k head dim", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 16), _q(1, 1, 4, 16)), ValueError, "k: expected shape"),
    ("v tokens", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 5, 32)), ValueError, "v: expected the shape of k"),
    ("no tokens", lambda: VF.attention(_q(1, 1, 0, 32), _q(1, 1, 0, 32), _q(1, 1, 0, 32)), ValueError, "at least one token"),
    ("head dim 256", lambda: VF.attention(_q(1, 1, 4, 256), _q(1, 1, 4, 256), _q(1, 1, 4, 256)), ValueError,
     "q: head dim 256 is not supported"),
    ("q last stride", lambda: VF.attention(_q(1, 1, 4, 32, 2)[..., 0], _q(1, 1, 4, 32), _q(1, 1, 4, 32)), ValueError,
     "q: expected unit stride on the last dim"),
    ("v last stride", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 32, 4).transpose(-1, -2)),
     ValueError, "v: expected unit stride on the last dim"),
    ("scale tensor", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), scale=torch.tensor(0.1)),
     TypeError, "scale: expected a Python float"),
    ("qkv rank 4", lambda: VF.attention_packed(_q(1, 4, 3, 64), 2), ValueError, "qkv: expected a 3-D"),
    ("qkv width", lambda: VF.attention_packed(_q(1, 4, 100), 2), ValueError, "qkv: last dim 100 is not 3 \\* num_heads"),
    ("num_heads 0", lambda: VF.attention_packed(_q(1, 4, 96), 0), ValueError, "num_heads: expected a positive int"),
    ("num_heads str", lambda: VF.attention_packed(_q(1, 4, 96), "2"), ValueError, "num_heads: expected a positive int"),
    ("qkv head dim 256", lambda: VF.attention_packed(_q(1, 4, 3 * 256), 1), ValueError, "qkv: head dim 256"),
    ("qkv last stride", lambda: VF.attention_packed(_q(1, 4, 96, 2)[..., 0], 2), ValueError,
     "qkv: expected unit stride on the last dim"),
]


@pytest.mark.parametrize("call,error,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- rotary embedding (EVA-02)


def rope_tables(n, D, device, general=False):
    """sin, cos [n, D] in timm's interleaved layout (each angle twice: [a0, a0, a1, a1, ...]), fp32;
    ``general``: independent random tables (no pair repetition, no sin^2 + cos^2 = 1), which the
    kernels' rotation and its transpose must handle exactly as well."""
    if general:
        return torch.randn(n, D, device=device), torch.randn(n, D, device=device)
    angles = (torch.rand(n, D // 2, device=device) * 2 - 1) * 3.1416 * 4
    angles = angles.repeat_interleave(2, -1)
    return angles.sin(), angles.cos()


def timm_rope(x, sin, cos, num_prefix_tokens):
    """timm's EVA attention rotation written out here (apply_rot_embed_cat, half=False): tokens past
    the prefix become x * cos + rot(x) * sin, rot(x) = [-x1, x0, -x3, x2, ...], in x's dtype."""
    head, tail = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    rot = torch.stack([-tail[..., 1::2], tail[..., ::2]], -1).reshape(tail.shape)
    return torch.cat([head, (tail * cos + rot * sin).to(x.dtype)], dim=2)


def roped_attention(sin, cos, num_prefix_tokens, scale=None):
    """reference.attention on timm-rotated q and k (float64 inputs: the float64 reference)."""
    def fn(q, k, v):
        return reference.attention(timm_rope(q, sin, cos, num_prefix_tokens), timm_rope(k, sin, cos, num_prefix_tokens),
                                   v, scale)
    return fn


# B, H, N, D, num_prefix_tokens, general tables: EVA-02's class token at N = 197, a two-chunk head
# (80 = 64 + 16), a padded tail chunk (72), one padded chunk (100), 4 register tokens, no prefix,
# N = prefix (nothing rotated), independent tables
ROPE_SHAPES = [
    (1, 2, 197, 64, 1, False),
    (1, 1, 70, 80, 1, False),
    (1, 2, 65, 72, 4, False),
    (1, 1, 33, 100, 0, False),
    (1, 1, 40, 32, 4, True),
    (1, 1, 3, 32, 3, False),
]


@pytest.mark.parametrize("bwd", ["two-pass", "single-pass"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_rope_kernels_vs_reference(dtype, shape, bwd, device):
    """The launchers with rope on NaN-poisoned outputs: o, lse, dq, dk, dv all written and against
    float64 (timm's rotation, then attention) and torch in the same dtype (the rotation rounded to the
    dtype, as timm's .type_as(v))."""
    B, H, N, D, npt, general = shape
    if device == "cpu" and dtype == torch.float16 and bwd == "single-pass" and N > 100:
        pytest.skip("interpreter time: fp16 single pass is covered at the smaller shapes")
    if device != "cpu" and bwd == "single-pass" and N > GPU_SINGLE_PASS_MAX_KEYS:
        pytest.skip("a single key block this wide does not fit in shared memory")
    q, k, v = make_qkv(B, H, N, N, D, dtype, device)
    do = torch.randn(B, H, N, D, device=device, dtype=dtype)
    sin, cos = rope_tables(N - npt, D, device, general)
    scale = D**-0.5
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, N), float("nan"), device=device)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    kernels.attention_fwd(q, k, v, o, lse, scale, rope=(sin, cos), num_prefix_tokens=npt)
    kernels.attention_bwd(do, q, k, v, o, lse, dq, dk, dv, scale, single_pass_cfgs(N) if bwd == "single-pass" else None,
                          rope=(sin, cos), num_prefix_tokens=npt)
    fn = roped_attention(sin, cos, npt)
    q64, k64 = (timm_rope(t.double(), sin, cos, npt) for t in (q, k))
    ref_lse = torch.logsumexp(scale * q64 @ k64.transpose(-1, -2), dim=-1)
    assert rel_err(lse, ref_lse) <= DTYPE_BOUND[dtype]
    check_attention("rope attention", o, (dq, dk, dv), fn, (q, k, v), do, dtype, device, N)


def test_rope_changes_the_result_and_spares_the_prefix(device):
    """The rotation is really applied (o differs from plain attention) and only past the prefix: with
    every key but the prefix's rotated by the identity (cos = 1, sin = 0), o equals plain attention."""
    q, k, v = make_qkv(1, 2, 40, 40, 32, torch.float32, device)
    sin, cos = rope_tables(39, 32, device)
    plain = VF.attention(q, k, v)
    roped = VF.attention(q, k, v, rope=(sin, cos), num_prefix_tokens=1)
    assert rel_err(roped, plain) > 1e-2
    identity = VF.attention(q, k, v, rope=(torch.zeros_like(sin), torch.ones_like(cos)), num_prefix_tokens=1)
    assert rel_err(identity, plain) <= 1e-6
    # a huge angle table on the prefix row would change everything: the prefix row must not be read
    rows_only = VF.attention(q, k, v, rope=(sin[1:], cos[1:]), num_prefix_tokens=2)
    ref = roped_attention(sin[1:].double(), cos[1:].double(), 2)(q.double(), k.double(), v.double())
    assert rel_err(rows_only, ref) <= 1e-5


@pytest.mark.parametrize("op", ["attention", "attention_packed"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_rope_public_ops(dtype, op, device, poison_empty):
    """VF.attention / VF.attention_packed with rope = timm's RotaryEmbeddingCat output chunked in two
    (sin, cos views with row stride 2D: read in place), EVA-02's class token; output and gradients
    against float64, one fused forward and backward launch."""
    B, H, N, D = 2, 2, 65, 64
    sincos = torch.cat(rope_tables(N - 1, D, device), -1)  # [N - 1, 2D], timm's layout
    sin, cos = sincos.chunk(2, -1)
    assert sin.stride() == (2 * D, 1)
    fn = roped_attention(sin, cos, 1)
    if op == "attention":
        leaf, (q, k, v) = packed_views(B, N, H, D, dtype, device)
        before = launches("attention_fwd"), launches("attention_bwd")
        out = VF.attention(q, k, v, rope=(sin, cos), num_prefix_tokens=1)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
        check_attention("rope attention", out, grads, fn, (q, k, v), do, dtype, device, N)
    else:
        qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
        before = launches("attention_packed_fwd"), launches("attention_packed_bwd")
        out = VF.attention_packed(qkv, H, rope=(sin, cos), num_prefix_tokens=1)
        do = torch.randn_like(out)
        (dqkv,) = torch.autograd.grad(out, qkv, do)

        def packed(t):
            q, k, v = t.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
            return fn(q, k, v).transpose(1, 2).reshape(B, N, H * D)
        compare_to_float64(["rope packed out", "rope packed dqkv"], None, packed, packed, [qkv], [do],
                           ours=((out,), [dqkv]))
    if dispatch.use_kernels(sin):
        assert (launches(f"{op}_fwd"), launches(f"{op}_bwd")) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("path", ["torch-forced", "torch-cpu"])
def test_rope_float64_gradcheck_on_the_torch_path(monkeypatch, path):
    select_path(path, monkeypatch, "cpu")
    q, k, v = make_qkv(2, 2, 7, 7, 8, torch.float32, "cpu")
    sin, cos = (t.double() for t in rope_tables(6, 8, "cpu"))
    before = dispatch.kernel_launches.copy()
    float64_gradcheck(lambda q, k, v: VF.attention(q, k, v, 0.4, rope=(sin, cos), num_prefix_tokens=1), [q, k, v])
    float64_gradcheck(lambda t: VF.attention_packed(t, 2, rope=(sin[:, :4], cos[:, :4]), num_prefix_tokens=1),
                      [torch.randn(2, 7, 3 * 2 * 4)])
    assert dispatch.kernel_launches == before


def test_rope_kernel_path_matches_the_torch_path(device, monkeypatch):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 50, 50, 32, torch.float32, device))
    sin, cos = rope_tables(49, 32, device)
    ours = VF.attention(q, k, v, rope=(sin, cos), num_prefix_tokens=1)
    ours_grads = torch.autograd.grad(ours.sum(), (q, k, v))
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    theirs = VF.attention(q, k, v, rope=(sin, cos), num_prefix_tokens=1)
    theirs_grads = torch.autograd.grad(theirs.sum(), (q, k, v))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_rope_empty_batch_on_every_path(device, monkeypatch, path):
    device = select_path(path, monkeypatch, device)
    sin, cos = rope_tables(32, 32, device)
    q, k, v = (torch.randn(0, 2, 33, 32, device=device, requires_grad=True) for _ in range(3))
    out = VF.attention(q, k, v, rope=(sin, cos), num_prefix_tokens=1)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape
    qkv = torch.randn(0, 33, 3 * 64, device=device, requires_grad=True)
    out = VF.attention_packed(qkv, 2, rope=(sin, cos), num_prefix_tokens=1)
    assert out.shape == (0, 33, 64)


def test_rope_opcheck(device):
    q, k, v = make_qkv(1, 2, 20, 20, 32, torch.float32, device)
    sin, cos = rope_tables(19, 32, device)
    torch.library.opcheck(torch.ops.vit_fast.attention_fwd, (q, k, v, 0.2, sin, cos, 1))
    o, lse = torch.ops.vit_fast.attention_fwd(q, k, v, 0.2, sin, cos, 1)
    torch.library.opcheck(torch.ops.vit_fast.attention_bwd, (torch.randn_like(o), q, k, v, o, lse, 0.2, sin, cos, 1))
    qkv = torch.randn(1, 20, 3 * 64, device=device)
    torch.library.opcheck(torch.ops.vit_fast.attention_packed_fwd, (qkv, 2, 0.2, sin, cos, 1))


@pytest.mark.slow
def test_rope_torch_compile_fullgraph(device):
    """The default backend (inductor) around the rope kernels: the eager numbers."""
    _, fn, inputs, _ = _op_cases(device)["rope packed"]
    check_compiled(fn, inputs, [torch.ones(2, 17, 64, device=device)], launches=[], backend="inductor", exact=False)


def test_rope_configs_are_chosen_with_rope_only(monkeypatch):
    """ROPE_CONFIGS replace the 16-bit D=64 backward tiles when rope is on; fp32 and rope-less calls
    keep CONFIGS; with rope no single-pass config is taken (none is compiled for it)."""
    assert kernels.bwd_configs(64, 197, torch.bfloat16, rope=True) == (kernels.ROPE_CONFIGS["dkdv", 64],
                                                                        kernels.ROPE_CONFIGS["dq", 64])
    assert kernels.bwd_configs(64, 197, torch.bfloat16) == (kernels.config("dkdv", 64, torch.bfloat16),
                                                            kernels.config("dq", 64, torch.bfloat16))
    assert kernels.config("dq", 64, torch.float32, rope=True) == kernels.config("dq", 64, torch.float32)
    monkeypatch.setitem(kernels.SINGLE_PASS_CONFIGS, 64, kernels.Config(32, 256, 8, 3))
    assert kernels.bwd_configs(64, 197, torch.bfloat16, rope=True)[1] is not None


def test_rope_bf16_under_the_interpreter_raises(device):
    require_interpreter(device)
    q = torch.randn(1, 2, 17, 32, dtype=torch.bfloat16)
    sin, cos = rope_tables(16, 32, "cpu")
    with pytest.raises(RuntimeError, match="bfloat16 under TRITON_INTERPRET=1"):
        VF.attention(q, q, q, rope=(sin, cos), num_prefix_tokens=1)


_T = rope_tables(3, 32, "cpu")
ROPE_BAD_INPUTS = [
    ("rope not a pair", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), rope=_T[0],
                                             num_prefix_tokens=1), TypeError, "rope: expected a .sin, cos. pair"),
    ("rope rows", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), rope=_T), ValueError,
     "rope: sin must be \\[N - num_prefix_tokens, D\\] = \\[4, 32\\], got \\[3, 32\\]"),
    ("rope cross", lambda: VF.attention(_q(1, 1, 5, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), rope=_T, num_prefix_tokens=1),
     ValueError, "rope: self-attention only"),
    ("rope odd D", lambda: VF.attention(_q(1, 1, 4, 33), _q(1, 1, 4, 33), _q(1, 1, 4, 33),
                                        rope=(_q(3, 33), _q(3, 33)), num_prefix_tokens=1), ValueError, "must be even"),
    ("rope 1-D", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), rope=(_q(96), _q(96)),
                                      num_prefix_tokens=1), ValueError, "rope sin: expected a 2-D"),
    ("rope D stride", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32),
                                           rope=(_q(3, 64)[:, ::2], _T[1]), num_prefix_tokens=1), ValueError,
     "rope sin: expected unit stride on the last dim"),
    ("prefix negative", lambda: VF.attention(_q(1, 1, 4, 32), _q(1, 1, 4, 32), _q(1, 1, 4, 32), rope=_T,
                                             num_prefix_tokens=-1), ValueError, "num_prefix_tokens: expected an int"),
    ("prefix > N", lambda: VF.attention_packed(_q(1, 4, 3 * 64), 2, rope=_T, num_prefix_tokens=5), ValueError,
     "num_prefix_tokens: 5 > N = 4"),
]


@pytest.mark.parametrize("call,error,match", [b[1:] for b in ROPE_BAD_INPUTS], ids=[b[0] for b in ROPE_BAD_INPUTS])
def test_rope_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_rope_tables_with_grad_are_refused_on_the_kernel_path(device):
    require_kernel_path(device)
    sin, cos = (t.requires_grad_() for t in rope_tables(3, 32, device))
    q = torch.randn(1, 1, 4, 32, device=device)
    with pytest.raises(ValueError, match="rope: the kernels give the sin / cos tables no gradient"):
        VF.attention(q, q, q, rope=(sin, cos), num_prefix_tokens=1)


# ----------------------------------------------------------------------------- module


def test_module_matches_reference_attention(device):
    """Same state_dict as reference.Attention: output and every parameter gradient match float64."""
    torch.manual_seed(1)
    dim, heads = 128, 2
    ref = reference.Attention(dim, heads, qkv_bias=True).to(device)
    mod = Attention(dim, heads, qkv_bias=True).to(device)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict())
    ref64 = reference.Attention(dim, heads, qkv_bias=True).to(device).double()
    ref64.load_state_dict(ref.state_dict())
    x = torch.randn(2, 197, dim, device=device)
    dy = torch.randn(2, 197, dim, device=device)
    before = launches("attention_packed_fwd")
    names = ["module out", "module dx", *(f"module d{n}" for n, _ in mod.named_parameters())]
    compare_to_float64(names, module_fn(mod), module_fn(ref), module_fn(ref64), [x, *ref.parameters()], [dy])
    if dispatch.use_kernels(x):
        assert launches("attention_packed_fwd") == before + 1


def test_module_qk_norm(device):
    """qk_norm: timm's q_norm / k_norm (LayerNorm over head_dim, eps 1e-6) before the kernels."""
    dim, heads = 64, 2
    mod = Attention(dim, heads, qkv_bias=True, qk_norm=True).to(device)
    assert [k for k in mod.state_dict() if "norm" in k] == ["q_norm.weight", "q_norm.bias", "k_norm.weight",
                                                            "k_norm.bias"]
    with torch.no_grad():
        for p in (mod.q_norm.weight, mod.k_norm.bias):
            p.normal_()
    x = torch.randn(2, 50, dim, device=device)
    sd = {k: t.double() for k, t in mod.state_dict().items()}
    x64 = x.double()
    q, k, v = (x64 @ sd["qkv.weight"].t() + sd["qkv.bias"]).reshape(2, 50, 3, heads, 32).permute(2, 0, 3, 1, 4)
    q = reference.layer_norm(q, sd["q_norm.weight"], sd["q_norm.bias"], eps=1e-6)
    k = reference.layer_norm(k, sd["k_norm.weight"], sd["k_norm.bias"], eps=1e-6)
    o = reference.attention(q, k, v).transpose(1, 2).reshape(2, 50, dim)
    y64 = o @ sd["proj.weight"].t() + sd["proj.bias"]
    assert rel_err(mod(x), y64) <= DTYPE_BOUND[torch.float32]


def test_module_attn_drop(device):
    mod = Attention(64, 2, attn_drop=0.1).to(device)
    x = torch.randn(1, 5, 64, device=device)
    with pytest.raises(NotImplementedError, match="attn_drop"):
        mod(x)
    mod.eval()
    assert mod(x).shape == x.shape  # dropout is the identity in eval mode
    Attention(64, 2, attn_drop=0.0).to(device).train()(x)


def test_module_bad_dim():
    with pytest.raises(ValueError, match="dim: 100 is not divisible by num_heads 3"):
        Attention(100, 3)


# ----------------------------------------------------------------------------- GPU

GPU_SHAPES = [  # B, H, N, D: ViT-B/16, ViT-H/14, ViT-B@384, long sequences, other head dims
    (8, 12, 197, 64),
    (4, 16, 257, 80),
    (2, 12, 577, 64),
    (1, 8, 1024, 64),
    (1, 4, 4096, 64),
    (1, 4, 4096, 128),
    (4, 6, 197, 32),
    (4, 4, 197, 48),
    (4, 4, 197, 96),
    (3, 2, 1, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_attention(dtype, shape, poison_empty):
    B, H, N, D = shape
    leaf, (q, k, v) = packed_views(B, N, H, D, dtype, "cuda")
    out = VF.attention(q, k, v)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    check_attention("gpu attention", out, grads, reference.attention, (q, k, v), do, dtype, "cuda", N)
    qkv = leaf.detach().reshape(B, N, 3 * H * D).requires_grad_()
    out_p = VF.attention_packed(qkv, H)
    (dqkv,) = torch.autograd.grad(out_p, qkv, do.transpose(1, 2).reshape(B, N, H * D))
    torch.testing.assert_close(out_p, out.transpose(1, 2).reshape(B, N, H * D), rtol=0, atol=0)
    torch.testing.assert_close(dqkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0), grads, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 12, 197, 64), (2, 16, 256, 64), (2, 4, 100, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_single_pass_backward(dtype, shape):
    """The single-pass backward candidates the sweep times (256-key blocks), at shapes they cover: N <= 256
    (ragged 197 and 100, and exactly one full block at 256)."""
    B, H, N, D = shape
    q, k, v = make_qkv(B, H, N, N, D, dtype, "cuda")
    do = torch.randn_like(q)
    o, lse = torch.empty_like(q), torch.empty(B, H, N, device="cuda")
    kernels.attention_fwd(q, k, v, o, lse, D**-0.5)
    for cfg in (kernels.Config(32, 256, 8, 3), kernels.Config(16, 256, 8, 3), kernels.Config(64, 256, 8, 2)):
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        kernels.attention_bwd(do, q, k, v, o, lse, dq, dk, dv, D**-0.5, (cfg, None))
        check_attention(f"single pass {cfg}", o, (dq, dk, dv), reference.attention, (q, k, v), do, dtype, "cuda", N)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 12, 257, 64, 1), (4, 16, 257, 64, 1), (2, 4, 261, 80, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_rope_attention(dtype, shape):
    """EVA-02 B/L at 224 (16 x 16 patches + the class token, D = 64) and a two-chunk head with
    register tokens: packed qkv with rope against float64, forward and dqkv."""
    B, H, N, D, npt = shape
    sin, cos = rope_tables(N - npt, D, "cuda")
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype, requires_grad=True)
    out = VF.attention_packed(qkv, H, rope=(sin, cos), num_prefix_tokens=npt)
    do = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, do)
    fn = roped_attention(sin, cos, npt)

    def packed(t):
        q, k, v = t.unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
        return fn(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    compare_to_float64(["gpu rope out", "gpu rope dqkv"], None, packed, packed, [qkv], [do], ours=((out,), [dqkv]))


@pytest.mark.gpu
def test_gpu_many_heads_grid():
    """B*H = 98,304 > 65,535: batch*heads on grid axis 0; first and last batches checked fwd and bwd."""
    B, H, N, D = 8192, 12, 197, 64
    q, k, v = (t.requires_grad_() for t in make_qkv(B, H, N, N, D, torch.float16, "cuda"))
    out = VF.attention(q, k, v)
    do = torch.randn_like(out)
    out.backward(do)
    for sl in (slice(0, 4), slice(B - 4, B)):
        check_attention("B*H=98304", out[sl], (q.grad[sl], k.grad[sl], v.grad[sl]), reference.attention,
                        (q[sl].detach(), k[sl].detach(), v[sl].detach()), do[sl], torch.float16, "cuda", N)


@pytest.mark.gpu
def test_gpu_deterministic():
    q, k, v = (t.requires_grad_() for t in make_qkv(4, 12, 197, 197, 64, torch.bfloat16, "cuda"))
    do = torch.randn_like(q)
    runs = [torch.autograd.grad(VF.attention(q, k, v), (q, k, v), do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_second_device():
    qkv = torch.randn(2, 197, 3 * 12 * 64, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    out = VF.attention_packed(qkv, 12)
    out.sum().backward()
    assert out.device == qkv.grad.device == torch.device("cuda:1")
    ref = reference.attention_packed(qkv.detach().double(), 12)
    assert rel_err(out, ref) <= DTYPE_BOUND[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_module_compile_fullgraph():
    torch.manual_seed(0)
    mod = Attention(768, 12, qkv_bias=True).cuda().to(torch.bfloat16)
    compiled = torch.compile(mod, fullgraph=True)
    x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = mod(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    yc = compiled(x)
    (dxc,) = torch.autograd.grad(yc, x, torch.ones_like(yc))
    torch.testing.assert_close(yc, y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dxc, dx, rtol=2e-2, atol=2e-2)
