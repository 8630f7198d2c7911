"""sm_90 compile of the Linear / MLP / SwiGLU kernels (tests/test_mlp.py's
test_kernels_compile_for_hopper runs it through sm90.run_script, with Triton's interpreter off):
every tabled config, the fused MLP backward's "act_grad" epilogue, SwiGLU's forward and backward and
the activation backward kernel fit an H100's shared memory; the 16-bit builds named below keep their
tiles in registers. Prints one "shared" line per compile through compile_sm90 below."""
import itertools
import sm90
from vit_fast.kernels import mlp as kernels

DT = {2: "bf16", 4: "fp32"}
PRECISION = {2: "tf32", 4: "ieee"}  # as kernels/host.py dot_precision picks them
serial = itertools.count()  # cubin file names


def compile_sm90(fn, types, constexprs, num_warps, num_stages):
    # as a launch at ViT shapes compiles: every pointer and int divisible by 16 (Triton's own
    # specialization, which lets the loads vectorize and pipeline)
    divisible = [n for n, t in types.items() if t[0] in "*i"]
    k, _ = sm90.compile_sm90(fn, types, constexprs, divisible, num_warps, num_stages, f"{fn.__name__}_{next(serial)}")
    print(fn.__name__, constexprs, dict(num_warps=num_warps, num_stages=num_stages), "shared", k.metadata.shared)


flags = dict(HAS_BIAS=True, HAS_RESIDUAL=True, SAVE_PRE=True)
TABLE = [*kernels.CONFIGS.items(), *kernels.SMALL_M_CONFIGS.items()]  # every tile a GPU launch can pick
for (kernel, size), c in TABLE:
    dt, blocks = DT[size], dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M)
    if kernel == "pointer":
        types = {n: "*" + dt for n in ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr", "pre_ptr")}
        types.update(db_ptr="*fp32")
        types.update({n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_ym")})
        constexprs = dict(stride_xk=1, stride_wk=1, stride_rn=1, stride_yn=1, ACTIVATION="quick_gelu", EVEN_K=True,
                          DOT_PRECISION=PRECISION[size], EPILOGUE="act")
        compile_sm90(kernels.linear_act_kernel, types, {**constexprs, **flags, **blocks}, c.num_warps, c.num_stages)
        # the fused MLP backward: dy [M, C] (unit column stride), W2 [C, hidden] read as W2.t() (stride_wn
        # = 1, stride_wk = hidden), pre read and dpre written [M, hidden], the bias partials
        types = {n: "*" + dt for n in ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr", "pre_ptr")}
        types.update(db_ptr="*fp32")
        types.update({n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_wk", "stride_rm", "stride_rn",
                                         "stride_ym")})
        for activation in ("gelu", "gelu_tanh", "quick_gelu") if size == 2 else ("gelu",):
            constexprs = dict(stride_xk=1, stride_wn=1, stride_yn=1, ACTIVATION=activation, EVEN_K=True,
                              DOT_PRECISION=PRECISION[size], EPILOGUE="act_grad", HAS_BIAS=True, HAS_RESIDUAL=False,
                              SAVE_PRE=False)
            k, res = sm90.compile_sm90(kernels.linear_act_kernel, types, {**constexprs, **blocks},
                                       [n for n, t in types.items() if t[0] in "*i"], c.num_warps, c.num_stages,
                                       f"act_grad_{size}_{activation}_{next(serial)}")
            print("act_grad", size, activation, dict(num_warps=c.num_warps, num_stages=c.num_stages),
                  "registers", res["REG"], "stack", res["STACK"], "smem", k.metadata.shared)
            if size == 2:  # fp32 ("ieee" dots on CUDA cores) may spill, as the attention kernels' fp32 entries
                assert res["STACK"] == "0", ("act_grad spills to local memory", activation, res)
    else:
        out_block = f"[{c.BLOCK_M}, {c.BLOCK_N // c.EPILOGUE_SPLIT}]"
        types = dict(x_desc=f"tensordesc<{dt}[{c.BLOCK_M}, {c.BLOCK_K}]>",
                     w_desc=f"tensordesc<{dt}[{c.BLOCK_N}, {c.BLOCK_K}]>", y_desc=f"tensordesc<{dt}{out_block}>",
                     pre_desc=f"tensordesc<{dt}{out_block}>", b_ptr="*" + dt, r_ptr="*" + dt)
        types.update({n: "i32" for n in ("M", "N", "K", "stride_rm", "num_programs")})
        constexprs = dict(stride_rn=1, ACTIVATION="gelu_tanh", EPILOGUE_SPLIT=c.EPILOGUE_SPLIT, FLATTEN=c.FLATTEN,
                          WARP_SPECIALIZE=c.WARP_SPECIALIZE, DOT_PRECISION=PRECISION[size])
        compile_sm90(kernels.linear_act_tma_kernel, types, {**constexprs, **flags, **blocks}, c.num_warps,
                     c.num_stages)
for size, c in kernels.SWIGLU_CONFIGS.items():
    dt = DT[size]
    types = {n: "*" + dt for n in ("x_ptr", "wg_ptr", "bg_ptr", "wx_ptr", "bx_ptr", "h_ptr", "pre_ptr")}
    types.update({n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_wgn", "stride_wxn", "stride_hm",
                                     "stride_pm")})
    constexprs = dict(stride_xk=1, stride_wgk=1, stride_wxk=1, stride_hn=1, HAS_BIAS_G=True, HAS_BIAS_X=True,
                      SAVE_PRE=True, DOT_PRECISION=PRECISION[size], EVEN_K=True, BLOCK_M=c.BLOCK_M,
                      BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M)
    k, res = sm90.compile_sm90(kernels.swiglu_kernel, types, constexprs, [n for n, t in types.items() if t[0] in "*i"],
                               c.num_warps, c.num_stages, f"swiglu_{size}")
    print("swiglu", size, dict(num_warps=c.num_warps, num_stages=c.num_stages), "registers", res["REG"],
          "stack", res["STACK"], "smem", k.metadata.shared)
    if size == 2:  # the tensor-core build keeps both accumulators in registers
        assert res["STACK"] == "0", ("swiglu spills to local memory", res)
types = dict(dh_ptr="*bf16", pre_ptr="*bf16", d_ptr="*bf16", db_partial_ptr="*fp32")
types.update({n: "i32" for n in ("M", "N", "stride_dhm", "stride_dhn", "stride_pm", "stride_dm")})
compile_sm90(kernels.swiglu_backward_kernel, types,
             dict(HAS_BIAS=True, ROWS_PER_PROGRAM=kernels.BWD_ROWS_PER_PROGRAM, BLOCK_M=kernels.BWD_BLOCK_M,
                  BLOCK_N=kernels.SWIGLU_BWD_BLOCK_N), num_warps=kernels.BWD_NUM_WARPS, num_stages=3)
types = dict(dy_ptr="*bf16", pre_ptr="*bf16", dpre_ptr="*bf16", db_partial_ptr="*fp32")
types.update({n: "i32" for n in ("M", "N", "stride_dym", "stride_dyn", "stride_prem", "stride_dprem")})
compile_sm90(kernels.activation_backward_kernel, types,
             dict(ACTIVATION="gelu", HAS_BIAS=True, ROWS_PER_PROGRAM=kernels.BWD_ROWS_PER_PROGRAM,
                  BLOCK_M=kernels.BWD_BLOCK_M, BLOCK_N=kernels.BWD_BLOCK_N), num_warps=kernels.BWD_NUM_WARPS,
             num_stages=3)
