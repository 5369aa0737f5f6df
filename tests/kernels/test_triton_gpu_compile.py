"""Every Triton kernel compiles for a real GPU (sm_90) on a machine without one.

The interpreter tests cannot catch what only the GPU compiler checks (types, layouts, ``tl.dot``
shapes, shared memory). Triton can compile ahead of time for a target without a device, so this
test compiles each kernel, at the block sizes the launchers use, for float16/bfloat16/float32 and
both routing levels. It runs in a subprocess because the other test modules set
``TRITON_INTERPRET=1``, which turns every ``@triton.jit`` function into an interpreted one.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mor_kernels.kernels import mor_conv2d as C, mor_lora as L, route as R

    failures = []

    def comp(fn, ptrs, consts, label, num_warps=4, num_stages=3):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptrs[name]
            else:
                sig[name] = "fp32" if name == "scaling" else "i32"
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)
            opts = {"num_warps": num_warps, "num_stages": num_stages}
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        except Exception as err:  # report every failure, not just the first
            failures.append(f"{label}: {type(err).__name__}: {str(err)[:1500]}")

    f32, i32 = "*fp32", "*i32"
    comp(R._route_kernel, dict(logits_ptr="*bf16", idx_ptr=i32, gate_ptr=f32, probs_ptr=f32, slot_ptr=i32),
         dict(TOP_K=8, RENORMALIZE=True, BLOCK_R=16, BLOCK_S=64), "route")
    rt = dict(idx_ptr=i32, gate_ptr=f32)
    for dt in ("*fp16", "*bf16", "*fp32"):
        for tok in (False, True):
            rp = L.padded_ranks(40, 8, 8, tok)
            tag = f"{dt} token={tok}"
            comp(L._shrink_kernel, dict(x_ptr=dt, a_ptr=dt, h_ptr=dt, u_ptr=f32, **rt),
                 dict(TOP_K=8, RP=rp, TOKEN_ROUTING=tok, STORE_U=True, BLOCK_M=L.BLOCK_M, BLOCK_K=L.BLOCK_K),
                 "shrink " + tag)
            for tokens in (64, 4096):  # the launchers' small and large GPU tiles
                cfg = L.gemm_config(torch.device("cuda"), torch.float32 if dt == "*fp32" else torch.float16, tokens, 640)
                warps = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                comp(L._expand_kernel, dict(x_ptr=dt, w_ptr=dt, bias_ptr=dt, b_ptr=dt, h_ptr=dt, base_ptr=dt,
                                            y_ptr=dt, **rt),
                     dict(TOP_K=8, RP=rp, TOKEN_ROUTING=tok, HAS_W=True, HAS_BIAS=True, HAS_BASE=True, **cfg),
                     f"expand {tag} {cfg}", **warps)
                comp(L._bwd_dx_kernel, dict(du_ptr=f32, a_ptr=dt, dy_ptr=dt, w_ptr=dt, dx_ptr=dt, **rt),
                     dict(TOP_K=8, RP=rp, TOKEN_ROUTING=tok, HAS_W=True, BLOCK_M=cfg["BLOCK_M"],
                          BLOCK_N=cfg["BLOCK_K"], BLOCK_K=cfg["BLOCK_N"]), f"bwd_dx {tag} {cfg}", **warps)
            dh = L.dh_config(torch.float32 if dt == "*fp32" else torch.float16, rp)
            comp(L._bwd_dh_kernel, dict(dy_ptr=dt, b_ptr=dt, u_ptr=f32, du_ptr=f32, dgate_ptr=f32, dbt_ptr=f32, **rt),
                 dict(TOP_K=8, RP=rp, TOKEN_ROUTING=tok, NEED_DB=True, BLOCK_M=dh["BLOCK_M"], BLOCK_N=dh["BLOCK_N"]),
                 "bwd_dh " + tag, num_warps=dh["num_warps"])
            comp(L._rank_grad_kernel, dict(l_ptr=f32, r_ptr=dt, out_ptr=f32),
                 dict(RP=rp, BLOCK_M=L.BLOCK_M, BLOCK_N=L.BLOCK_N), "rank_grad " + tag)
        comp(C._conv_up_kernel, dict(z_ptr=dt, b_ptr=dt, bias_ptr=dt, y_ptr=dt, u_ptr=f32, **rt),
             dict(TOP_K=8, RP=16, HAS_BIAS=True, STORE_U=True, BLOCK_M=C.BLOCK_M, BLOCK_N=C.BLOCK_N), "conv_up " + dt)
    print("\\n".join(failures) if failures else "all kernels compiled")
    raise SystemExit(1 if failures else 0)
    """
)


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    if "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip(f"this triton cannot compile ahead of time: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all kernels compiled" in proc.stdout
