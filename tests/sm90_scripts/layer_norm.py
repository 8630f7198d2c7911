"""sm_90 compile of every LayerNorm table entry (tests/test_layer_norm.py's
test_tables_compile_for_hopper_without_spills runs it through sm90.run_script, with Triton's
interpreter off): each forward / backward entry at its widest C, bf16, fits an H100's shared
memory, keeps its rows in registers up to SPILL_FREE_MAX_C, and the backward's programs per SM fit
in one wave. Prints one "registers" line per entry."""
import triton
from sm90 import compile_sm90
from vit_fast.kernels import layer_norm as kernels

SPILL_FREE_MAX_C = 4096  # the tables' comment: wider rows spill a few values (correct, slower)


def compile_table_entry(fn, constexprs, num_warps, tag, max_c):
    types = {p.name: "i32" if p.name in ("n_rows", "C") or p.name.endswith("stride") else "fp32" if p.name == "eps"
             else "*fp32" if p.name.startswith(("mean", "rstd", "dweight", "dbias")) else "*bf16"
             for p in fn.params if not p.is_constexpr}
    # as a launch at ViT widths specializes: pointers, C and row strides divisible by 16
    divisible = [n for n, t in types.items() if t != "fp32" and n != "n_rows"]
    _, resources = compile_sm90(fn, types, constexprs, divisible, num_warps, 1, tag)
    print(tag, "registers", resources["REG"], "stack", resources["STACK"])
    if max_c <= SPILL_FREE_MAX_C:
        assert resources["STACK"] == "0", (tag, "spills to local memory", resources)
    return int(resources["REG"])


flags = dict(HAS_WEIGHT=True)
for max_c, rows, warps in kernels.HOPPER_FWD_CONFIGS:
    for residual in (False, True):
        rows_here = max(1, rows // 2) if residual else rows  # as fwd_config picks them
        compile_table_entry(kernels.layer_norm_fwd_kernel, dict(HAS_RESIDUAL=residual, HAS_BIAS=True,
                            ROWS_PER_PROGRAM=rows_here, BLOCK_C=triton.next_power_of_2(max_c), **flags), warps,
                            f"fwd_{max_c}_res{int(residual)}", max_c)
for max_c, rows, warps, per_sm in kernels.HOPPER_BWD_CONFIGS:
    for ds in (False, True):
        registers = compile_table_entry(kernels.layer_norm_bwd_kernel, dict(HAS_DS=ds, COMPUTE_DWEIGHT=True,
                                        COMPUTE_DBIAS=True, ROWS_PER_PROGRAM=rows,
                                        BLOCK_C=triton.next_power_of_2(max_c), **flags), warps,
                                        f"bwd_{max_c}_ds{int(ds)}", max_c)
        # the backward's grid is one wave of per_sm programs per SM: they must all fit in an SM's
        # 64K registers (allocated per thread in steps of 8), or a second wave doubles the time
        needed = per_sm[int(ds)] * warps * 32 * -(-registers // 8) * 8
        assert needed <= 65536, (f"bwd_{max_c}_ds{int(ds)}", per_sm[int(ds)], "programs need", needed, "registers")
