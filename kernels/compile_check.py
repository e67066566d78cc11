"""Compile every Triton kernel variant for a GPU target, without a GPU.

    TRITON_INTERPRET=0 python -m attrefine_fast.kernels.compile_check [--arch 90] [--quick | --all]

Triton's interpreter (used by the CPU tests) checks what the kernels compute but not that they
compile: the GPU path adds its own rules (block shapes for tl.dot, dtypes of tl.sqrt_rn, loop
bounds, register layouts). This lowers each kernel to a cubin for the given compute capability
with Triton's bundled ptxas, so those errors show up on a machine without a GPU. By default
each compile-time case is compiled with the first autotuning configuration, plus every
configuration once; ``--quick`` compiles each compile-time branch just once at small blocks
(the test suite's check) and ``--all`` the full cross product.

For sm_90 it also checks each compiled kernel's shared memory against what a block may have
there (an H100 refuses a larger launch with OutOfResources), among them the largest lime_fit
tiles the launcher picks for each dtype and M: by default in the FINISH phase with the first
configuration (float64's tiles take as much there as in FUSED, which takes 30-65 s to compile
at those sizes; --quick checks float64's largest), under --all in every phase and configuration
(float32's largest need is FUSED's at BLOCK_N = 64: 229,376 bytes at 64 x 256).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_PTR = {"f32": "*fp32", "f64": "*fp64", "f16": "*fp16", "bf16": "*bf16", "u8": "*u8", "i64": "*i64", "i32": "*i32", "bool": "*i1"}


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    """Every argument of fn: the given pointer types, constexpr for constants, i32 otherwise."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = _PTR[pointers[name]]
        else:
            sig[name] = "i32"
    return sig


def _perturb_variants(full: bool):
    from . import perturb as mod

    # (image dtype, output dtype, normalized)
    cases = [
        ("f32", "f32", False), ("f32", "f32", True), ("f32", "bf16", True), ("f64", "f64", True),
        ("f64", "bf16", False), ("u8", "f32", True), ("f16", "f16", False), ("bf16", "bf16", True),
        ("f32", "u8", False), ("u8", "u8", False),
    ]
    for index, (config, (src, dst, norm)) in enumerate(itertools.product(mod._CONFIGS, cases)):
        if not full and index % len(cases) != 0 and config is not mod._CONFIGS[0]:
            continue
        compute = "f64" if src == "f64" else "f32"
        stat = compute if norm else src
        pointers = {"images_ptr": src, "fudge_ptr": src, "segments_ptr": "i64", "masks_ptr": "bool",
                    "mean_ptr": stat, "std_ptr": stat, "out_ptr": dst, "flag_ptr": "i32"}
        channels_last = (index + index // len(cases)) % 2 == 1  # both layouts across cases and configurations
        wide = index % 3 == 2  # 64-bit offsets in some cases of each configuration
        constexprs = dict(config.kwargs, CHANNELS_LAST=channels_last, NORMALIZE=norm, COMPUTE_F64=src == "f64",
                          HALF_OUT=dst in ("f16", "bf16"), INT64_INDEX=wide)
        yield (f"perturb {src}->{dst} norm={norm} {config.kwargs} channels_last={channels_last} int64={wide}",
               mod._perturb_kernel.fn, pointers, constexprs, config.num_warps)


def _lime_fit_pointers(t: str) -> dict:
    return {"masks_ptr": "bool", "targets_ptr": t, "weights_ptr": t, "num_segments_ptr": "i64", "params_ptr": t,
            "gram_ptr": t, "rhs_ptr": t, "beta_ptr": t, "unsolved_ptr": "i32", "coef_ptr": t, "intercept_ptr": t,
            "score_ptr": t, "local_pred_ptr": t}


def _lime_fit_variants(full: bool):
    from . import lime_fit as mod

    phases = (mod.FUSED, mod.NORMAL_EQUATIONS, mod.FINISH)
    tuned = [(False, c) for c in mod._CONFIGS] + [(True, c) for c in mod._F64_CONFIGS]
    grid = itertools.product(tuned, phases, (False, True), (16, 64, 128))
    for (f64, config), phase, has_weights, block_m in grid:
        first = config is (mod._F64_CONFIGS if f64 else mod._CONFIGS)[0]
        main = phase == mod.FUSED and not has_weights and block_m == 64
        if not full and not first and not main:
            continue
        t = "f64" if f64 else "f32"
        wide = has_weights and block_m == 16  # 64-bit offsets in some cases of each configuration
        constexprs = dict(config.kwargs, PHASE=phase, HAS_WEIGHTS=has_weights, F64=f64, INT64_INDEX=wide,
                          BLOCK_M=block_m, BLOCK_L=16)
        yield (f"lime_fit {t} phase={phase} weights={has_weights} BLOCK_M={block_m} {config.kwargs} int64={wide}",
               mod._lime_fit, _lime_fit_pointers(t), constexprs, config.num_warps)


def _lime_fit_largest_variants(full: bool):
    """The largest tiles the launcher picks, per dtype and M, with the configurations the
    autotuner may run them with (only the first, and only FINISH, unless full)."""
    from . import lime_fit as mod

    phases = (mod.FUSED, mod.NORMAL_EQUATIONS, mod.FINISH) if full else (mod.FINISH,)
    for f64, configs in ((False, mod._CONFIGS), (True, mod._F64_CONFIGS)):
        t = "f64" if f64 else "f32"
        for block_m, block_l in sorted({mod.blocks(m, mod.MAX_LABELS) for m in (64, 128, mod.MAX_SEGMENTS)}):
            kept = configs if f64 else mod._fits_in_registers(configs, {}, BLOCK_M=block_m)
            for config, phase in itertools.product(kept if full else kept[:1], phases):
                constexprs = dict(config.kwargs, PHASE=phase, HAS_WEIGHTS=False, F64=f64, INT64_INDEX=False,
                                  BLOCK_M=block_m, BLOCK_L=block_l)
                yield (f"lime_fit largest {t} phase={phase} BLOCK_M={block_m} BLOCK_L={block_l} {config.kwargs} "
                       f"num_warps={config.num_warps}", mod._lime_fit, _lime_fit_pointers(t), constexprs, config.num_warps)


def _masked_pgd_variants(full: bool):
    from . import masked_pgd_step as mod

    for t, l2, has_weight, flat in itertools.product(("f32", "f64", "f16", "bf16"), (False, True), (False, True), (True, False)):
        compute = "f64" if t == "f64" else "f32"
        for stage in (0, 1, 2) if l2 else (2,):
            pointers = {"x_adv_ptr": t, "x_ptr": t, "grad_ptr": t, "weight_ptr": t, "params_ptr": compute,
                        "g_partial_ptr": compute, "d_partial_ptr": compute, "flag_ptr": "i32"}
            wide = has_weight and not flat  # 64-bit offsets in some cases
            constexprs = dict(STAGE=stage, L2=l2, HAS_WEIGHT=has_weight, F64=t == "f64", FLAT=flat, INT64_INDEX=wide,
                              BLOCK=mod.BLOCK)
            yield (f"masked_pgd_step {t} l2={l2} weight={has_weight} stage={stage} flat={flat} int64={wide}",
                   mod._masked_pgd_kernel, pointers, constexprs, 4)


# Together these take every branch of every kernel at least once, and check the shared memory
# of the largest float64 tile (whose M x L tiles take the most).
_QUICK = (
    "perturb f32->bf16 norm=True", "perturb f64->f64 norm=True", "perturb u8->u8 norm=False",
    "lime_fit f32 phase=0 weights=False BLOCK_M=16", "lime_fit f64 phase=1 weights=True BLOCK_M=16",
    "lime_fit f64 phase=2 weights=False BLOCK_M=16", "lime_fit largest f64 phase=2 BLOCK_M=256",
    "masked_pgd_step f64 l2=True weight=True stage=1 flat=True", "masked_pgd_step f32 l2=True weight=False stage=2 flat=False",
    "masked_pgd_step bf16 l2=False weight=True stage=2 flat=False", "segment_mean u8 int64=False",
    "segment_mean f32 int64=True", "flag_pass ids i64", "flag_pass non-finite bf16",
)


def _segment_mean_variants(full: bool):
    from . import segment_mean as mod

    for t in ("f32", "u8", "f64", "f16", "bf16") if full else ("f32", "u8"):
        for wide in (False, True):
            pointers = {"images_ptr": t, "segments_ptr": "i64", "sums_ptr": "f64", "counts_ptr": "f64"}
            constexprs = {"INT64_INDEX": wide, "BLOCK": mod.BLOCK, "BLOCK_M": mod.BLOCK_M}
            yield f"segment_mean {t} int64={wide}", mod._segment_sums_kernel, pointers, constexprs, mod.NUM_WARPS


def _flag_pass_variants(full: bool):
    from . import device_checks as mod

    cases = [("ids", "i64"), ("ids", "i32"), ("non-finite", "f32"), ("non-finite", "f64"), ("non-finite", "f16"),
             ("non-finite", "bf16")]
    for check, t in cases:
        constexprs = {"RANGE": check == "ids", "BLOCK": mod.BLOCK}
        yield f"flag_pass {check} {t}", mod._flag_pass_kernel, {"data_ptr": t, "flag_ptr": "i32"}, constexprs, 4


def variants(mode: str = "default"):
    """(name, kernel, pointer dtypes, constexprs, num_warps) for mode "quick", "default" or "all"."""
    full = mode == "all"
    seen = set()
    for variant in itertools.chain(
        _segment_mean_variants(full), _perturb_variants(full), _lime_fit_variants(full),
        _lime_fit_largest_variants(full), _masked_pgd_variants(full), _flag_pass_variants(full),
    ):
        if mode == "quick":
            prefix = next((q for q in _QUICK if variant[0].startswith(q)), None)
            if prefix is None or prefix in seen:
                continue
            seen.add(prefix)
        yield variant


def triton_compiles_offline() -> bool:
    """Whether the installed Triton takes sources the way compile_all builds them (Triton >= 3.3:
    ASTSource with constexprs)."""
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource).parameters




def shared_memory_limit(arch: int) -> int | None:
    """Shared memory a block may have on sm_<arch>, in bytes (only sm_90's is known here: the
    limit lime_fit's tiles are sized for)."""
    from .lime_fit import SHARED_MEMORY_LIMIT

    return {90: SHARED_MEMORY_LIMIT}.get(arch)


def compile_all(arch: int = 90, mode: str = "default", verbose: bool = False) -> list[tuple[str, float]]:
    """Compile each variant to a cubin for sm_<arch>; raises on the first failure, or on the
    first that needs more shared memory than sm_<arch> gives a block."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not triton_compiles_offline():
        raise RuntimeError(f"compiling without a GPU needs Triton >= 3.3 (ASTSource with constexprs), found {triton.__version__}")

    target = GPUTarget("cuda", arch, 32)
    done = []
    for name, fn, pointers, constexprs, num_warps in variants(mode):
        start = time.perf_counter()
        src = ASTSource(fn=fn, signature=_signature(fn, pointers, constexprs), constexprs=constexprs)
        try:
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
        except Exception as e:
            raise RuntimeError(f"{name} does not compile for sm_{arch}: {e}") from e
        assert compiled.asm.get("cubin"), name
        shared, limit = compiled.metadata.shared, shared_memory_limit(arch)
        if limit is not None and shared > limit:
            raise RuntimeError(f"{name} needs {shared} bytes of shared memory, more than sm_{arch}'s {limit} per block")
        done.append((name, time.perf_counter() - start))
        if verbose:
            print(f"ok {done[-1][1]:6.2f}s  {shared:6d} B shared  {name}", flush=True)
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100) or 90 (H100)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="each compile-time branch once")
    which.add_argument("--all", action="store_true", help="every configuration with every compile-time case")
    args = parser.parse_args(argv)
    done = compile_all(args.arch, "all" if args.all else "quick" if args.quick else "default", verbose=True)
    print(f"{len(done)} kernel variants compile for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
