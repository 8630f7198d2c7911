"""sm_90 compile of the attention kernels (tests/test_attention.py's
test_kernels_compile_for_hopper_without_spills runs it through sm90.run_script, with Triton's
interpreter off): every 16-bit table entry at each head dim, and the RoPE builds."""
import itertools
import torch
from sm90 import compile_sm90
from vit_fast.kernels import attention as kernels

KERNELS = {"fwd": kernels.attention_fwd_kernel, "dq": kernels.attention_bwd_dq_kernel,
           "dkdv": kernels.attention_bwd_dkdv_kernel}
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)  # every table row, and the two-chunk heads (48, 80, 96)


def arg_type(name):
    if name in ("LSE", "DELTA", "SIN", "COS"):
        return "*fp32"
    if name in ("qk_scale", "scale"):
        return "fp32"
    if name.startswith("stride") or name in ("H", "N_Q", "N_KV", "head_dim", "n_prefix"):
        return "i32"
    return "*bf16"  # Q, K, V, O and their gradients


for (kernel, fn), head_dim in itertools.product(KERNELS.items(), HEAD_DIMS):
    cfg = kernels.config(kernel, head_dim, torch.bfloat16)  # the 16-bit entry: the tensor-core path
    block_d, block_d_tail, pad_d, pad_d_tail = kernels.head_chunks(head_dim)
    types = {p.name: arg_type(p.name) for p in fn.params if not p.is_constexpr}
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_D_TAIL=block_d_tail,
                      PAD_D=pad_d, PAD_D_TAIL=pad_d_tail, DOT_PRECISION="tf32",
                      **({"WRITE_DQ": False} if kernel == "dkdv" else {}))
    # as a launch at ViT shapes specializes: pointers, strides and head_dim divisible by 16
    divisible = [n for n, t in types.items() if t.startswith("*") or n.startswith("stride") or n == "head_dim"]
    compiled, resources = compile_sm90(fn, types, constexprs, divisible, cfg.num_warps, cfg.num_stages,
                                       f"{kernel}_{head_dim}")
    print(kernel, head_dim, (block_d, block_d_tail), tuple(cfg), "registers", resources["REG"],
          "stack", resources["STACK"], "shared", compiled.metadata.shared)
    assert resources["STACK"] == "0", (kernel, head_dim, "spills to local memory", resources)
# EVA-02's rotary embedding in the kernels (q / k rotated where loaded, dq / dk rotated back):
# one-chunk and two-chunk heads
for (kernel, fn), head_dim in itertools.product(KERNELS.items(), (64, 80)):
    cfg = kernels.config(kernel, head_dim, torch.bfloat16, rope=True)  # ROPE_CONFIGS where they differ
    block_d, block_d_tail, pad_d, pad_d_tail = kernels.head_chunks(head_dim)
    types = {p.name: arg_type(p.name) for p in fn.params if not p.is_constexpr}
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_D_TAIL=block_d_tail,
                      PAD_D=pad_d, PAD_D_TAIL=pad_d_tail, DOT_PRECISION="tf32", ROPE=True,
                      **({"WRITE_DQ": False} if kernel == "dkdv" else {}))
    divisible = [n for n, t in types.items() if t.startswith("*") or n.startswith("stride") or n == "head_dim"]
    compiled, resources = compile_sm90(fn, types, constexprs, divisible, cfg.num_warps, cfg.num_stages,
                                       f"rope_{kernel}_{head_dim}")
    print("rope", kernel, head_dim, tuple(cfg), "regs", resources["REG"], "stack", resources["STACK"],
          "smem", compiled.metadata.shared)
    if head_dim == 64:  # ViT-B / EVA-02-B heads: no spills (D=80's dK/dV spills 48 B: printed only)
        assert resources["STACK"] == "0", ("rope", kernel, head_dim, "spills to local memory", resources)
