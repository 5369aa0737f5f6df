"""Every Triton kernel compiles for a real GPU (sm_90) on a machine without one.

The interpreter tests cannot catch what only the GPU compiler checks (types, layouts, ``tl.dot``
shapes, shared memory). Triton can compile ahead of time for a target without a device, so this
test compiles each kernel, at the block sizes the launchers use, for float16/bfloat16/float32 and
both routing levels. It runs in a subprocess because the other test modules set
``TRITON_INTERPRET=1``, which turns every ``@triton.jit`` function into an interpreted one.

``test_real_launches_compile_for_sm90`` goes further: it runs the real ops (forward and backward, on
CPU tensors, the launches intercepted) at SD-like and at odd shapes, with the tile tables answering
as on a GPU, and compiles exactly what each launch would: the JIT's own specialization of the
arguments (16-divisible pointers, strides and sizes get ``tt.divisibility`` hints, as on a device),
the launch's ``num_warps``/``num_stages``. So the 3-stage pipelined tile configs are compiled too (every
tile and split the forward's table gives at SD shapes), the 16-bit GEMM loops (the forward's and the
backward's) are checked to be pipelined (``cp.async`` in the PTX), and every 16-bit forward tile (all
have ``BLOCK_M >= 64``) to run on Hopper's warpgroup MMA (``wgmma`` in the PTX).
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
    from mor_kernels.kernels import mor_conv2d as C, mor_lora as L, mor_lora_bwd as LB, mor_lora_tiles as T, route as R

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
            dtype = torch.float32 if dt == "*fp32" else torch.float16
            fwd, bwd = {}, {}  # every tile the tables give at SD-like shapes, batch 1 and 8
            for batch in (1, 8):
                for tokens in (64, 256, 1024, 4096):
                    for d_in, d_out in ((320, 320), (640, 640), (1280, 1280), (5120, 1280), (1280, 5120)):
                        cfg = T.fwd_config(torch.device("cuda"), dtype, batch, tokens, d_in, d_out, rp)
                        fwd[tuple(sorted(cfg.items()))] = cfg
                        cfg = T.bwd_config(torch.device("cuda"), dtype, batch, tokens, d_in, d_out, rp)
                        bwd[tuple(sorted(cfg.items()))] = cfg
            fwd_ptrs = dict(x_ptr=dt, w_ptr=dt, bias_ptr=dt, a_ptr=dt, b_ptr=dt, base_ptr=dt, y_ptr=dt, u_ptr=f32,
                            ws_acc_ptr=f32, ws_u_ptr=f32, lock_ptr=i32, **rt)
            for cfg in fwd.values():
                cfg = dict(cfg)
                warps = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                for has_w in (True, False):  # mor_linear (+ bias), mor_lora (+ base)
                    comp(L._fwd_kernel, fwd_ptrs,
                         dict(TOP_K=8, RP=rp, TOKEN_ROUTING=tok, HAS_W=has_w, HAS_BIAS=has_w, HAS_BASE=not has_w,
                              STORE_U=has_w, **cfg), f"fwd {tag} W={has_w} {cfg} {warps}", **warps)
            bwd_ptrs = dict(dy_ptr=dt, w_ptr=dt, a_ptr=dt, b_ptr=dt, x_ptr=dt, u_ptr=f32, dx_ptr=dt, part_ptr=f32,
                            gpart_ptr=f32, dgate_ptr=f32, ws_acc_ptr=f32, ws_dh_ptr=f32, lock_ptr=i32, **rt)
            for cfg in bwd.values():
                cfg = dict(cfg)
                warps = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                comp(LB._bwd_kernel, bwd_ptrs,
                     dict(TOP_K=8, RP=rp, TOKEN_ROUTING=tok, HAS_W=True, NEED_DX=True, NEED_DA=True, NEED_DB=True,
                          NEED_DG=True, **cfg), f"bwd {tag} {cfg} {warps}", **warps)
            comp(LB._bwd_reduce_kernel, dict(part_ptr=f32, gpart_ptr=f32, idx_ptr=i32, gate_ptr=f32, da_ptr=dt, db_ptr=dt,
                                             dgate_ptr=f32),
                 dict(TOP_K=8, RP=rp, TOKEN_ROUTING=tok, NEED_DA=True, NEED_DB=True, NEED_DG=not tok,
                      BLOCK=LB.REDUCE_BLOCK), "bwd_reduce " + tag)
        comp(C._conv_up_kernel, dict(z_ptr=dt, zr_ptr=dt, b_ptr=dt, bias_ptr=dt, **rt),
             dict(TOP_K=8, RP=16, HAS_BIAS=True, BLOCK_M=C.BLOCK_M, BLOCK_N=C.BLOCK_N), "conv_up " + dt)
        comp(C._conv_bwd_kernel, dict(dy_ptr=dt, zr_ptr=dt, b_ptr=dt, dz_ptr=dt, part_ptr=f32, gpart_ptr=f32,
                                      ws_ptr=f32, lock_ptr=i32, **rt),
             dict(TOP_K=8, RP=16, NEED_DZ=True, SPLIT_DZ=dt != "*fp32", NEED_DB=True, NEED_DG=True, SPLIT=8,
                  BLOCK_M=C.BLOCK_M, BLOCK_N=C.BLOCK_N, BLOCK_R=C.BLOCK_R), "conv_bwd " + dt)
        comp(C._finite_ranks_kernel, dict(a_ptr=dt, out_ptr=dt), dict(REPS=2, BLOCK=1024), "finite_ranks " + dt)
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


RECORD = textwrap.dedent(
    """
    import collections

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from mor_kernels.kernels import mor_lora as L, mor_lora_bwd as LB, mor_lora_tiles as T
    from mor_kernels.ops import triton_backend as TB
    from mor_kernels.testing import random_case

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    launches, fwd_tiles = {}, set()
    state = dict(aligned=False)  # whether the shape being run has 16-divisible sizes and strides

    def record(self, *args, grid, warmup, **kwargs):  # what JITFunction.run compiles, minus the launch
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, options)
        key = (self.__name__, str(signature), str(constexprs), str(attrs), str(options))
        launches.setdefault(key, (self, signature, constexprs, attrs, options, state["aligned"], kwargs.get("BLOCK_M", 0)))
        if self.__name__ == "_fwd_kernel" and kwargs["BLOCK_K"] == 64:  # a 16-bit GPU tile
            fwd_tiles.add((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["SPLIT_K"]))

    JITFunction.run = record
    fwd_config, bwd_config = T.fwd_config, T.bwd_config
    L.fwd_config = lambda device, dtype, *shape: fwd_config(torch.device("cuda"), dtype, *shape)
    LB.bwd_config = lambda device, dtype, *shape: bwd_config(torch.device("cuda"), dtype, *shape)

    def grads(out, tensors):
        torch.autograd.grad(out, [t for t in tensors if t is not None and t.requires_grad], torch.ones_like(out))

    # every forward tile and split of the table (16 bits; sample routing RP 16, token routing RP 64): the SD
    # shapes at batch 1 (split-K at 256 and 64 tokens, 8 splits for ff.net.2's d_in 5120), 128x128 at batch 2
    # x 4096 x 640; an odd shape (nothing 16-divisible). Weights frozen above 8192 rows (no CPU dW matmul).
    LINEAR = [dict(batch=1, tokens=4096, d_in=320, d_out=320), dict(batch=1, tokens=1024, d_in=640, d_out=640),
              dict(batch=1, tokens=256, d_in=1280, d_out=1280), dict(batch=1, tokens=64, d_in=1280, d_out=1280),
              dict(batch=1, tokens=64, d_in=5120, d_out=1280), dict(batch=2, tokens=130, d_in=41, d_out=67),
              dict(batch=2, tokens=4096, d_in=640, d_out=640)]
    want_tiles = set()
    PAPER = dict(num_shared=8, num_routed=32, num_zero=4, top_k=8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for routing in ("sample", "token"):
            for shape in LINEAR:
                state["aligned"] = shape["d_in"] % 16 == 0 and shape["d_out"] % 16 == 0
                c = random_case(routing=routing, **shape, **PAPER, seed=0).to(dtype, requires_grad=True)
                if dtype != torch.float32:
                    rp = T.padded_ranks(40, 8, 8, routing == "token")
                    args = (shape["batch"], shape["tokens"], shape["d_in"], shape["d_out"], rp)
                    cfg = fwd_config(torch.device("cuda"), dtype, *args)
                    want_tiles.add((cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"]))
                c.weight.requires_grad_(shape["tokens"] * shape["batch"] < 8192)
                y = TB.mor_linear(c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, 8, 0.5)
                grads(y, [c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.gate])
            state["aligned"] = False
            base = torch.randn(*c.x.shape[:-1], c.lora_b.shape[0], dtype=dtype)
            with torch.no_grad():
                TB.mor_lora(c.x, c.lora_a, c.lora_b, c.idx, c.gate, 8, 0.5, base=base)
        for shape in (dict(batch=1, d_in=64, d_out=320, height=32, width=32), dict(d_in=5, d_out=67, height=13, width=11)):
            for k in (1, 3):  # 1x1: the linear kernels on a token view; 3x3: cuDNN + the conv kernels
                c = random_case(kernel_size=k, **shape, **PAPER, seed=0).to(dtype, requires_grad=True)
                pad = (k // 2, k // 2)
                y = TB.mor_conv2d(c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, 8, 0.5, (1, 1), pad, (1, 1))
                grads(y, [c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.gate])
        for rows, slots, k, z in ((4096, 36, 8, 4), (130, 7, 3, 2)):
            TB.route(torch.randn(rows, slots).to(dtype), k, z)

    failures, counts, unpipelined, no_wgmma, wgmma_checked = [], collections.Counter(), [], [], 0
    for (name, *_), (fn, signature, constexprs, attrs, options, aligned, block_m) in launches.items():
        counts[name] += 1
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        except Exception as err:  # report every failure, not just the first
            failures.append(f"{name} {signature} {constexprs} {options.num_warps}/{options.num_stages}: "
                            f"{type(err).__name__}: {str(err)[:1500]}")
            continue
        gemm = name in ("_fwd_kernel", "_bwd_kernel")
        lowp = any(v in ("*fp16", "*bf16") for k, v in signature.items() if k in ("x_ptr", "dy_ptr"))
        label = f"{name} {signature} {constexprs} {options.num_warps}/{options.num_stages}"
        if gemm and lowp and aligned and options.num_stages >= 3 and "cp.async" not in kernel.asm["ptx"]:
            unpipelined.append(label)
        if name == "_fwd_kernel" and lowp and block_m >= 64:
            wgmma_checked += 1
            if "wgmma" not in kernel.asm["ptx"]:
                no_wgmma.append(label)
    fwd_tiles = sorted(fwd_tiles)
    print("compiled:", dict(counts), "16-bit forward tiles (M, N, split):", fwd_tiles)
    if fwd_tiles != sorted(want_tiles) or not any(split > 1 for _, _, split in fwd_tiles):
        failures.append(f"the forward's GPU tiles launched {fwd_tiles}, the table gives {sorted(want_tiles)}")
    if no_wgmma or not wgmma_checked:
        failures.append(f"16-bit forward tiles without wgmma ({wgmma_checked} checked): {no_wgmma}")
    print("\\n".join(failures) if failures else "all launches compiled")
    print("\\n".join(unpipelined) if unpipelined else "16-bit GEMM loops pipelined")
    raise SystemExit(1 if failures or unpipelined else 0)
    """
)


def test_real_launches_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", RECORD], env=env, capture_output=True, text=True, timeout=1200)
    internals = ("create_function_from_signature", "_pack_args", "make_backend", "GPUTarget")
    if (
        proc.returncode != 0
        and any(f"{name}" in proc.stderr for name in internals)
        and ("ImportError" in proc.stderr or "AttributeError" in proc.stderr)
    ):
        pytest.skip(
            f"this triton's JIT internals differ from 3.8's (cannot replay its specialization): {proc.stderr[-300:]}"
        )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "all launches compiled" in proc.stdout and "16-bit GEMM loops pipelined" in proc.stdout
