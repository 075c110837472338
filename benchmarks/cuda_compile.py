"""Compile mlx_clip's CUDA kernels with NVRTC on a machine without a GPU, as `mx.fast.cuda_kernel` would on one.

Why: the device loan is short and a compile error found there costs a round trip. NVRTC compiles without a driver,
so the kernels' source (mlx_clip/attention_kernels_*.py, assembled by gpu_attention) is checked here, in the default
test run, for the H100's sm_90.
The source is wrapped the way MLX's CUDA backend wraps it (mlx/backend/cuda/custom_kernel.cpp, `build_kernel`):
inputs as `const T*` parameters, outputs as `T*`, template arguments as `constexpr` locals, all inside
`namespace mlx::core::cu`. MLX's own default header is left out: the kernels use nothing from it.

NVRTC and the CUDA headers come from the `nvidia-cuda-nvrtc` and `nvidia-cuda-runtime` wheels (pyproject's dev
extra, Linux x86-64): `nvrtc_available()` says whether they are installed.

    python -m benchmarks.cuda_compile      # compiles every attention kernel, prints the PTX sizes
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

_CUDA_TYPES = {"bfloat16": "__nv_bfloat16", "float32": "float", "float16": "__half", "int32": "int32_t",
               "uint32": "uint32_t", "bool": "bool"}


def _cuda_root() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in sorted(Path(root).glob("cu*")):
            if (sub / "include" / "cuda_bf16.h").exists() and list((sub / "lib").glob("libnvrtc.so*")):
                return sub
    return None


def nvrtc_available() -> bool:
    return _cuda_root() is not None


# MLX's default header defines Shape as cuda::std::array<int32_t, MAX_NDIM = 10> and Strides as the same of int64_t;
# the same layouts without libcu++
_SHAPE = ("typedef int int32_t;\n"  # as MLX's header gives it (the int32 inputs' type)
          "typedef unsigned int uint32_t;\n"
          "struct Shape {\n  int data[10];\n"
          "  __device__ int operator[](int i) const { return data[i]; }\n};\n"
          "struct Strides {\n  long long data[10];\n"
          "  __device__ long long operator[](int i) const { return data[i]; }\n};\n")


def _constant(name: str, value: int | bool | str) -> str:
    """A template argument as MLX declares it: constexpr int / bool, or `using` for a dtype (given by its name)."""
    if isinstance(value, str):
        return f"  using {name} = {_CUDA_TYPES[value]};\n"
    return f"  constexpr {'bool' if isinstance(value, bool) else 'int'} {name} = {str(value).lower()};\n"


def wrap(name: str, header: str, source: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
         template: dict[str, int | bool | str]) -> str:
    """The translation unit MLX builds for one kernel; inputs/outputs are (name, mlx dtype name) pairs, a dtype template
    argument is a dtype name."""
    params = []
    for n, t in inputs:  # MLX adds an input's shape, strides and ndim, in that order, when the source uses them
        params += [f"    const {_CUDA_TYPES[t]}* {n}"]
        params += [f"    const __grid_constant__ {kind} {n}{suffix}" for suffix, kind in
                   (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")) if f"{n}{suffix}" in source]
    params += [f"    {_CUDA_TYPES[t]}* {n}" for n, t in outputs]
    constants = "".join(_constant(k, v) for k, v in template.items())
    return (f"{_SHAPE}{header}\nnamespace mlx::core::cu {{\n\n__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
            + constants + "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n")


@functools.lru_cache(maxsize=1)
def _nvrtc() -> tuple[ctypes.CDLL, Path]:
    """NVRTC, loaded once a process, and the CUDA root whose headers it compiles against."""
    root = _cuda_root()
    if root is None:
        raise RuntimeError("NVRTC not installed: pip install nvidia-cuda-nvrtc nvidia-cuda-runtime")
    # NVRTC dlopens its builtins library by file name; loaded first, it is found whatever the library path (a process
    # that imported torch has it loaded already, one that did not would fail to open it)
    for builtins in sorted((root / "lib").glob("libnvrtc-builtins.so*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(sorted((root / "lib").glob("libnvrtc.so*"))[0])), root


def compile_ptx(unit: str, arch: str = "sm_90") -> tuple[bool, str, int]:
    """(ok, log, PTX size in bytes) of NVRTC compiling `unit` for `arch`."""
    lib, root = _nvrtc()
    program = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(program), unit.encode(), b"kernel.cu", 0, None, None)
    if status != 0:
        raise RuntimeError(f"nvrtcCreateProgram: NVRTC status {status}")
    options = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", f"-I{root / 'include'}".encode()]
    status = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    ptx_size = 0
    if status == 0:
        lib.nvrtcGetPTXSize(program, ctypes.byref(size))
        ptx_size = size.value
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return status == 0, log.value.decode(errors="replace"), ptx_size


def _shapes(spec) -> tuple[dict, dict[str, dict]]:
    """A tiled kernel's block and step shape (rows a warp MT, tiles a step KS, warps a block): the defaults
    mlx_clip.gpu_attention launches, and by name suffix the other shapes its switches give."""
    from mlx_clip import gpu_attention as ga

    if "_dq_" in spec.name:  # MLXCLIP_GPU_DQ_ROWS, _DQ_STEP, _DQ_WARPS
        return ({"MT": ga.DQ_ROWS // 16, "KS": ga.DQ_STEP // 16, "WARPS": ga.DQ_WARPS},
                {"_mt2": {"MT": 2, "KS": 1, "WARPS": 4}, "_mt2_ks2": {"MT": 2, "KS": 2, "WARPS": 4},
                 "_mt2_warps8": {"MT": 2, "KS": 1, "WARPS": 8}, "_mt1_ks1": {"MT": 1, "KS": 1, "WARPS": 4}})
    if "_dkdv_" in spec.name:  # MLXCLIP_GPU_DKDV_ROWS, _DKDV_STEP, _DKDV_WARPS
        return ({"MT": ga.DKDV_ROWS // 16, "KS": ga.DKDV_STEP // 16, "WARPS": ga.DKDV_WARPS},
                {"_warps4": {"MT": 1, "KS": 1, "WARPS": 4}, "_mt2": {"MT": 2, "KS": 1, "WARPS": 4},
                 "_ks2": {"MT": 1, "KS": 2, "WARPS": 4}})
    return ({"MT": ga.FWD_ROWS // 16, "WARPS": ga.FWD_WARPS},  # the forward: MLXCLIP_GPU_FWD_ROWS, _FWD_WARPS
            {"_mt2": {"MT": 2, "WARPS": 4}})


def _variants(spec, tiled: bool) -> list[tuple[str, dict]]:
    """(name suffix, template) of the ways a kernel is launched: causal or not; the tiled kernels also with 16-bit
    loads (MLXCLIP_GPU_LDMATRIX=0) and with ldmatrix for every operand (=2), and in each block and step shape their
    switches give (_shapes)."""
    if not tiled:
        return [("_full", {"CAUSAL": False}), ("_causal", {"CAUSAL": True})]
    default, others = _shapes(spec)
    ldsm, rows = {"LDSM_TRANS": True, "LDSM_ROWS": False}, {"LDSM_TRANS": True, "LDSM_ROWS": True}
    out = [("_full", {"CAUSAL": False} | ldsm), ("_causal", {"CAUSAL": True} | ldsm),
           ("_full_noldsm", {"CAUSAL": False, "LDSM_TRANS": False, "LDSM_ROWS": False}),
           ("_full_ldsm2", {"CAUSAL": False} | rows), ("_causal_ldsm2", {"CAUSAL": True} | rows)]
    out = [(suffix, template | default) for suffix, template in out]
    for name, shape in others.items():
        out += [(f"_full{name}", {"CAUSAL": False} | ldsm | shape), (f"_causal{name}", {"CAUSAL": True} | ldsm | shape)]
    return out


def kernel_units(lengths=(50, 77, 197, 256, 320), heads=12) -> list[tuple[str, str]]:
    """(name, translation unit) for every attention kernel at each length, each way it is launched."""
    from mlx_clip import gpu_attention

    units = []
    for length in lengths:
        nt, tiled = -(-length // 16), length > gpu_attention.MAX_TOKENS
        for spec in gpu_attention.tiled_specs(nt) if tiled else gpu_attention.SHORT_SPECS + gpu_attention.JOINT_SPECS:
            for suffix, template in _variants(spec, tiled):
                name = f"{spec.name}_L{length}{suffix}"
                units.append((name, wrap(name, gpu_attention.HEADER, spec.source,
                                         [(n, spec.dtype(n)) for n in spec.inputs],
                                         [(n, spec.dtype(n)) for n in spec.outputs],
                                         {"L": length, "H": heads, "NT": nt} | template)))
    return units


def reduce_units(widths=(520, 768, 1024, 3072, 4096), dtypes=("bfloat16", "float32", "float16"),
                 ) -> list[tuple[str, str]]:
    """(name, translation unit) for gpu_reduce's kernels: the column sum at each width and dtype, the LayerNorm
    backward and forward at the widths they take (520: a partly used last 256-column chunk)."""
    from mlx_clip import gpu_reduce

    units = []
    for width in widths:
        for dtype in dtypes:
            template = {"T": dtype, "C": width, "NC": -(-width // 256)}
            name = f"mlxclip_column_sum_C{width}_{dtype}"
            units.append((name, wrap(name, gpu_reduce.HEADER, gpu_reduce.COLUMN_SUM, [("x", dtype)],
                                     [("partial", "float32")], template)))
            if width <= gpu_reduce.MAX_LN_WIDTH:
                name = f"{gpu_reduce.layer_norm_kernel_name(1e-5)}_C{width}_{dtype}"
                units.append((name, wrap(name, gpu_reduce.HEADER, gpu_reduce.layer_norm_source(1e-5),
                                         [("x", dtype), ("w", dtype), ("g", dtype)],
                                         [("dx", dtype), ("partial", "float32")], template)))
                name = f"{gpu_reduce.layer_norm_kernel_name(1e-5, True)}_C{width}_{dtype}"
                units.append((name, wrap(name, gpu_reduce.HEADER, gpu_reduce.layer_norm_source(1e-5, True),
                                         [("x", dtype), ("w", dtype), ("b", dtype)], [("y", dtype)], template)))
    for dtype in dtypes:  # the partials' finish (MLXCLIP_GPU_REDUCE_FINISH): any width, read at run time
        name = f"mlxclip_reduce_finish_{dtype}"
        units.append((name, wrap(name, gpu_reduce.HEADER, gpu_reduce.FINISH, [("partial", "float32")],
                                 [("out", dtype)], {"T": dtype})))
    return units


def embedding_units(widths=(512, 520, 768), dtypes=("bfloat16", "float32", "float16")) -> list[tuple[str, str]]:
    """(name, translation unit) for gpu_embedding's table gradient at each width and dtype (520: a partly used last
    256-column chunk)."""
    from mlx_clip import gpu_embedding, gpu_reduce

    return [(f"mlxclip_embedding_gradient_C{width}_{dtype}",
             wrap(f"mlxclip_embedding_gradient_C{width}_{dtype}", gpu_reduce.HEADER, gpu_embedding.TABLE_GRADIENT,
                  [("keys", "uint32"), ("g", dtype)], [("out", dtype)],
                  {"T": dtype, "C": width, "NC": -(-width // 256), "V": 49408}))
            for width in widths for dtype in dtypes]


def activation_units(dtypes=("bfloat16", "float32", "float16")) -> list[tuple[str, str]]:
    """(name, translation unit) for gpu_activation's kernels: each kernel, activation and dtype."""
    from mlx_clip import gpu_activation

    units = []
    for which, (source, inputs, outputs) in gpu_activation.SOURCES.items():
        for kind, number in gpu_activation.KINDS.items():
            for dtype in dtypes:
                name = f"mlxclip_activation_{which}_{kind}_{dtype}"
                units.append((name, wrap(name, gpu_activation.HEADER, source, [(n, dtype) for n in inputs],
                                         [(n, dtype) for n in outputs], {"T": dtype, "KIND": number})))
    return units


def multi_tensor_units(dtypes=("bfloat16", "float32")) -> list[tuple[str, str]]:
    """(name, translation unit) for the multi-tensor kernels (mlx_clip/train/multi_tensor.py): the sum of squares
    (row-contiguous inputs, and strided ones read where they lie) and AdamW, at 3 arrays and at a full launch."""
    from mlx_clip.train import multi_tensor as mt

    units = []
    for dtype in dtypes:
        for count in (3, mt.STRIDED_MAX_TENSORS):
            grads = [(f"g{i}", dtype) for i in range(count)] + [("tiles", "int32")]
            name = f"mlxclip_multi_sumsq_strided_{count}_{dtype}"
            units.append((name, wrap(name, mt._HEADER, mt.sumsq_strided_source(count), grads,
                                     [("partial", "float32")], {})))
        for count in (3, mt.MAX_TENSORS):
            grads = [(f"g{i}", dtype) for i in range(count)] + [("tiles", "int32")]
            name = f"mlxclip_multi_sumsq_{count}_{dtype}"
            units.append((name, wrap(name, mt._HEADER, mt.sumsq_source(count), grads, [("partial", "float32")], {})))
            # the moments as optim.moment_dtypes makes them: m in the weight's dtype, v fp32
            inputs = ([(f"{k}{i}", dtype if k in "pgm" else "float32") for k in "pgmv" for i in range(count)]
                      + [("tiles", "int32"), ("hp", "float32"), ("lr", "float32"), ("step", "int32"),
                         ("gscale", "float32"), ("finite", "bool")])
            outputs = [(f"{k}{i}", dtype if k in ("po", "mo") else "float32") for k in ("po", "mo", "vo")
                       for i in range(count)]
            name = f"mlxclip_multi_adamw_{count}_{dtype}"
            units.append((name, wrap(name, mt._HEADER, mt.adamw_source(count, 0.9, 0.98, 1e-6), inputs, outputs, {})))
    return units


def main():
    for name, unit in (kernel_units() + reduce_units() + embedding_units() + activation_units()
                       + multi_tensor_units()):
        ok, log, size = compile_ptx(unit)
        print(f"{name}: {'ok' if ok else 'FAILED'} ({size:,} bytes of PTX)")
        if log.strip():
            print(log)


if __name__ == "__main__":
    main()
