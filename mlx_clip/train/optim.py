"""What trains and how fast: freezing (LiT, unlock last N), weight-decay exclusions, layer-wise LR decay, the LR schedule,
and an AdamW that reads a per-parameter LR scale and weight decay from its own state (so all of it compiles into one step).
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_clip.cpu_streams import Spread, in_own_shape, on_cpu, with_leading_axes
from mlx_clip.model import CLIP
from mlx_clip.switches import env_switch
from mlx_clip.train import multi_tensor

# Decoupled weight decay is not applied to these (as open_clip excludes gains/biases/logit_scale, plus lookup tables,
# whose rows only move when their token appears and so should not be shrunk every step).
NO_DECAY = re.compile(r"(bias$|layer_?norm|layrnorm|logit_scale|logit_bias|token_embedding|position_embedding|class_embedding)")
_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.")


# Off the CPU (MLXCLIP_GPU_FOLD_CLIP, default on since session 22; gpu_ab fold=1|0): the clip factor folded into AdamW's
# moment coefficients (GroupedAdamW._adamw_arrays), one graph node per parameter fewer than multiplying each gradient
# first. Session 17, one step at a time, the H200 ran ViT-B/32 slower with it (51.1 vs 47.7 ms in one process,
# benchmarks/results/gpu-s17-h200.md); with steps queued (session 21) that step is its host's time, which goes per
# graph node, and the fold took it 43.8 / 45.4 -> 38.6 ms, ViT-B-16 unchanged (90.4 vs 89.8 ms), +0.4 GiB of peak
# on ViT-B-32 (benchmarks/results/gpu-s22-h200.md)
FOLD_CLIP_GPU = env_switch("MLXCLIP_GPU_FOLD_CLIP", True)


def lr_schedule(lr: float, total_steps: int, warmup: int = 0, kind: str = "cosine", min_lr_ratio: float = 0.0):
    """LR as a pure function of the 0-based optimizer step (an mx.array or int): linear warm-up from lr/warmup to lr,
    then cosine to lr*min_lr_ratio at total_steps, or constant."""
    floor = lr * min_lr_ratio

    def at(step):
        s = mx.array(step).astype(mx.float32)
        warm = lr * (s + 1) / max(warmup, 1)
        if kind == "const":
            after = mx.array(lr, mx.float32)
        else:
            progress = mx.clip((s - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            after = floor + (lr - floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        return mx.where(s < warmup, warm, after)

    return at


def freeze_towers(model: CLIP, lock_image: bool = False, lock_text: bool = False, unlock_last: int = 0) -> None:
    """Freeze whole towers (with their projection); `unlock_last` keeps the last N layers, final norm and projection
    of a locked tower trainable."""
    towers = [("vision_model", "visual_projection", "post_layernorm", lock_image),
              ("text_model", "text_projection", "final_layer_norm", lock_text)]
    for tower, projection, final_norm, locked in towers:
        if not locked:
            continue
        getattr(model, tower).freeze()
        getattr(model, projection).freeze()
        if unlock_last > 0:
            layers = getattr(model, tower).encoder.layers
            for layer in layers[max(len(layers) - unlock_last, 0):]:
                layer.unfreeze()
            getattr(getattr(model, tower), final_norm).unfreeze()
            getattr(model, projection).unfreeze()


def layer_id(name: str, config) -> tuple[int, int]:
    """(depth of this parameter in its tower, number of depths) for layer-wise LR decay: embeddings and the vision
    pre-norm (it sits below block 0) 0, block i at i+1, final norm and projection at L+1. logit_scale counts as top."""
    if m := _LAYER.match(name):
        tower = config.vision_config if m.group(1) == "vision_model" else config.text_config
        return int(m.group(2)) + 1, tower.num_hidden_layers + 1
    tower = config.vision_config if name.startswith(("vision", "visual")) else config.text_config
    top = tower.num_hidden_layers + 1
    return (0, top) if (".embeddings." in name or ".pre_layrnorm." in name) else (top, top)


def param_hparams(model: CLIP, weight_decay: float, layer_decay: float = 1.0) -> dict[str, tuple[float, float]]:
    """name -> (lr scale, weight decay) for every trainable parameter."""
    out = {}
    for name, _ in tree_flatten(model.trainable_parameters()):
        depth, top = layer_id(_base_name(name), model.config)
        scale = layer_decay ** (top - depth) if layer_decay != 1.0 else 1.0
        out[name] = (scale, 0.0 if NO_DECAY.search(_base_name(name)) else weight_decay)
    return out


def _base_name(name: str) -> str:
    # LoRA wraps a Linear as `<layer>.linear`; adapters inherit the wrapped layer's depth and decay (none for lora_*).
    return name.replace(".linear.", ".")


# Parameters up to this many elements get AdamW as one kernel writing p, m and v; larger ones as single-output kernels
# that write over their inputs. MLX donates no input to a kernel of several outputs (each output holds the input
# list), so the one kernel allocates p, m and v anew while the old ones live: for 64 MB arrays 448 vs 256 MB peak
# (benchmarks/perf-notes.md change 26). Small arrays cost little memory that way and save the launches and passes.
FUSED_UPDATE_MAX = 1 << 18
# Off the CPU every update is that one kernel (the fewest launches and graph nodes: the ViT-B/32 step is host-bound).
# Its outputs get old buffers in input order, item size matching (mlx/backend/common/compiled.cpp): with bf16 weights
# and fp32 moments the new weight, and with the fold (FOLD_CLIP_GPU) more, is allocated anew each step while the old
# lives. MLXCLIP_GPU_INPLACE_UPDATE=1 gives parameters above FUSED_UPDATE_MAX the CPU's form there too, kernels
# writing over p, m and v; opt-in: on an H200 (session 23) ViT-B/16's peak did not move, 23,329 MiB either way
# (benchmarks/results/gpu-s23-h200.md). The GPU-branch ViT-B-32 step (bf16,
# b2) traced and run on the CPU: peak +654 -> +381 MiB over the model and optimizer state (fold off: +549 -> +313),
# but 6,464 -> 7,439 graph nodes (99 parameters, 7 views and 2 kernels more each), the host's time where the step is
# host-bound. Queued, a step's updates overlap the next step's forward (ViT-B/16 on an H200: 22.9 GiB peak queued,
# 22.0 one step at a time).
GPU_INPLACE_UPDATE = env_switch("MLXCLIP_GPU_INPLACE_UPDATE", False)
# AdamW's first moment kept in bf16 for bf16 weights (the "bfloat16" policy), since session 28; the second in fp32
# (`moment_dtypes` says why). MLXCLIP_BF16_MOMENTS=0 keeps both in fp32 as before: 2 bytes a parameter more (0.28 GiB
# of a ViT-B). The GPU branch's update stays one fused kernel per parameter either way (GPU-branch ViT-B-32 b2: 5,705
# graph nodes, `python -m benchmarks.step_census --arch ViT-B-32 --batch 2 --gpu-branch`); a bf16 v read back by the
# update would put its longest chain one op past MLX's fusion depth (mlx/compile.cpp: 11) and cut the skipped step's
# zeroing into a kernel of its own writing an fp32 copy of every gradient (6,076 nodes, and a larger peak)
BF16_MOMENTS = env_switch("MLXCLIP_BF16_MOMENTS", True)


class GroupedAdamW(optim.Adam):
    """AdamW (torch semantics: bias-corrected, decoupled decay p *= 1 - lr*wd) with a per-parameter LR scale and weight
    decay kept in the optimizer state, so parameter groups need no Python branching inside the compiled step."""

    def __init__(self, learning_rate, hparams: dict[str, tuple[float, float]], betas=(0.9, 0.98), eps=1e-6):
        super().__init__(learning_rate=learning_rate, betas=list(betas), eps=eps, bias_correction=True)
        self.hparams = hparams
        self._gradient_scale, self._finite, self._ok, self._moment_scale = None, None, None, None
        self._moment_scale_sq = None
        self._spread, self._tags = None, {}

    def apply_gradients(self, gradients: dict, parameters: dict):
        if self._gradient_scale is not None:  # the guarded update (the train step's); plain `update` calls skip this
            flat = tree_flatten(gradients)
            if multi_tensor.applies([g for _, g in flat]):
                return self._apply_multi_tensor(flat, parameters)
        self._spread, self._tags = Spread(), {}  # each update on the least-loaded CPU stream (cpu_streams.py says why)
        try:
            return super().apply_gradients(gradients, parameters)
        finally:
            self._spread, self._tags = None, {}

    def guarded_update(self, model: nn.Module, gradients: dict, gradient_scale: mx.array, finite: mx.array) -> None:
        """`update` with the gradients multiplied by `gradient_scale` (clipping) and, where `finite` is false, every
        parameter, moment and the step count left as they were. Both happen inside each parameter's update, one pass
        over memory: as separate passes (scale the gradients, then `where` over parameters and state) they cost as
        much as AdamW itself on a CPU, where these loops are memory bound."""
        ok = finite.astype(mx.float32)
        if on_cpu():  # made apart (stop_gradient is not fused): no bool in the kernels (_zeroed)
            ok = mx.stop_gradient(ok)
        self._gradient_scale, self._finite, self._ok = gradient_scale * ok, finite, ok
        # With FOLD_CLIP_GPU (off the CPU, the default) the clip factor goes into the moments' coefficients, one
        # scalar per step (_adamw_arrays says why); 0 on a skipped step, where the factor itself may be nan (a nan norm)
        self._moment_scale = None if on_cpu() or not FOLD_CLIP_GPU else mx.where(finite, gradient_scale, 0.0)
        self._moment_scale_sq = None if self._moment_scale is None else mx.square(self._moment_scale)
        try:
            counters = {k: self.state[k] for k in ("step", "learning_rate") if k in self.state}  # the schedule's too
            self.update(model, gradients)
            for name, old in counters.items():
                self.state[name] = mx.where(finite, self.state[name], old)
        finally:
            self._gradient_scale, self._finite, self._ok, self._moment_scale = None, None, None, None
            self._moment_scale_sq = None

    def _apply_multi_tensor(self, flat_gradients: list, parameters: dict) -> dict:
        """The guarded update of every parameter in a few CUDA launches (multi_tensor.py); the same state layout. Each
        parameter's LR scale and decay come from `self.hparams`, the values `init` wrote into the state."""
        if not self._initialized:
            self.init(tree_unflatten(flat_gradients))
        for name, scheduler in self._schedulers.items():  # as Optimizer.apply_gradients does
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1
        names = [name for name, _ in flat_gradients]
        current = dict(tree_flatten(parameters))
        states = [_state_at(self.state, name) for name in names]
        new_p, new_m, new_v = multi_tensor.adamw(
            [current[n] for n in names], [g for _, g in flat_gradients], [s["m"] for s in states],
            [s["v"] for s in states], [self.hparams.get(n, (1.0, 0.0)) for n in names], self.learning_rate,
            self.step, self._gradient_scale, self._finite, self.betas, self.eps)
        for state, m, v in zip(states, new_m, new_v):
            state["m"], state["v"] = m, v
        return tree_unflatten(list(zip(names, new_p)))

    def init_single(self, parameter: mx.array, state: dict):
        first, second = moment_dtypes(parameter.dtype)
        state["m"], state["v"] = mx.zeros(parameter.shape, first), mx.zeros(parameter.shape, second)

    def init(self, parameters: dict):
        super().init(parameters)
        for name, _ in tree_flatten(parameters):
            scale, wd = self.hparams.get(name, (1.0, 0.0))
            state = _state_at(self.state, name)
            state["lr_scale"], state["wd"] = mx.array(scale, mx.float32), mx.array(wd, mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        if self._spread is None:
            return self._adamw(gradient, parameter, state)
        with self._spread.stream_for(parameter.size):
            return self._adamw(gradient, parameter, state)

    def _adamw(self, gradient: mx.array, parameter: mx.array, state: dict):
        stream = mx.default_stream(mx.default_device())
        if on_cpu() and parameter.size <= FUSED_UPDATE_MAX:
            # one kernel writing p, m and v (MLX keeps a step output in the kernel that makes it), with this
            # stream's own constants (_tag says why)
            new, state["m"], state["v"] = self._adamw_arrays(gradient, parameter, state["m"], state["v"], state,
                                                             self._tag(stream))
            return new
        update = lambda g, p, m, v: self._adamw_arrays(g, p, m, v, state)  # noqa: E731
        arrays = (gradient, parameter, state["m"], state["v"])
        if not on_cpu() and GPU_INPLACE_UPDATE and parameter.size > FUSED_UPDATE_MAX:
            new, state["m"], state["v"] = with_leading_axes(1, update, *arrays)
        else:
            # In a shape of this stream's own: equal-shaped parameters on two streams would otherwise share their
            # broadcast constants and run the strided kernel (cpu_streams.in_own_shape says why). Reshaping m and v
            # back cuts them out of the parameter's kernel: on the CPU four single-output kernels, each writing over
            # its input (elsewhere in_own_shape changes nothing and the update is one kernel: GPU_INPLACE_UPDATE).
            new, state["m"], state["v"] = in_own_shape(stream, update, *arrays)
        return new

    def _tag(self, stream) -> mx.array:
        """1.0 as a 0-d array of `stream`'s own, made once per traced update. A fused update multiplies each of its
        constants by it: MLX's compiler merges equal constants and equal broadcasts of them across streams, and a
        kernel reading a broadcast made on another stream runs its strided variant (cpu_streams.in_own_shape). The
        tags differ in how they are computed (k / k for the k-th stream), so the compiler cannot merge them."""
        key = str(stream)
        if key not in self._tags:
            k = float(len(self._tags) + 1)
            self._tags[key] = (self.step.astype(mx.float32) * 0.0 + k) / k
        return self._tags[key]

    def _adamw_arrays(self, gradient, parameter, m, v, state: dict, tag: mx.array | None = None):
        """(new parameter, m, v): one guarded AdamW update (`_adamw` says which kernels it becomes); `tag` (see
        `_tag`) multiplies every constant when given."""
        own = (lambda x: x * tag) if tag is not None else (lambda x: x)  # noqa: E731
        lr = self.learning_rate * state["lr_scale"]
        b1, b2 = self.betas
        step = self.step.astype(mx.float32)
        c1 = lr / (1 - b1**step)  # bias corrections from the true betas, also on a skipped step (no 1/0 there)
        c2 = own(mx.rsqrt(1 - b2**step))
        keep_m, keep_v = own(b1), own(b2)  # the old moments' weights, (1 - those) the gradient's
        # Folded (FOLD_CLIP_GPU, the GPU's default) the clip factor multiplies the moments' coefficients (m's by s,
        # v's by s²), not the gradient: as its own multiply the gradient's scaling stays out of the update's fused
        # kernel (mlx/compile.cpp bounds a fused kernel's depth, 11, and inputs, 24), one more launch and graph node per
        # parameter, ~400 a ViT step; folded, the scaled gradient is not rounded to the gradient's dtype (bf16).
        fold = self._moment_scale is not None
        if self._gradient_scale is not None and not fold:
            gradient = gradient * own(self._gradient_scale).astype(gradient.dtype)
        if self._finite is not None:
            # A skipped step writes the old values back through the same kernels: gradient 0 (so inf/nan cannot
            # leak in), moment weights 1, LR 0. A `where(finite, new, old)` over p, m and v instead cost an extra
            # pass over each and kept m and v out of the update's fused kernel: ~800 more kernels per ViT-B/32 step.
            ok = self._ok
            gradient = _zeroed(gradient, self._finite, own)
            keep_m, keep_v = 1 - own((1 - b1) * ok), 1 - own((1 - b2) * ok)
            lr, c1 = lr * ok, c1 * ok
        into_m, into_v = 1 - keep_m, 1 - keep_v
        if fold:
            into_m, into_v = into_m * self._moment_scale, into_v * self._moment_scale_sq
        # squared in fp32 (a no-op for fp32 gradients): in fp16 a large gradient (the steps clipping is for)
        # overflows, and in bf16 the square lost an fp32 v half its bits (the cast came after it before session 28)
        gradient = gradient.astype(mx.float32)
        # computed in fp32 (the coefficients are fp32 arrays) and stored in the state's own dtypes (moment_dtypes); the
        # update reads them as stored: an fp32 value read by both a stored bf16 moment and the update would end MLX's
        # fused kernel there (three kernels a parameter)
        m = (keep_m * m + into_m * gradient).astype(m.dtype)
        v = (keep_v * v + into_v * mx.square(gradient)).astype(v.dtype)
        update = c1 * m / (mx.sqrt(v) * c2 + own(self.eps))
        # decay and step in fp32, rounded once to the weight's dtype (in bf16 each product and the difference were
        # rounded: up to ~2 ulps off where a weight crosses zero); for fp32 weights the same operations as before
        new = (parameter.astype(mx.float32) * (1 - lr * state["wd"]) - update).astype(parameter.dtype)
        return new, m, v


def moment_dtypes(weight: mx.Dtype) -> tuple[mx.Dtype, mx.Dtype]:
    """(m, v) dtypes for a weight of dtype `weight`. Until session 28 both followed the weight at init and the fp32
    coefficients promoted bf16 ones to fp32 at the first update (and a second trace of the compiled step). Now:
    m in bf16 for bf16 weights (BF16_MOMENTS): its average (β1 = 0.9) moves 10% a step, far above bf16's resolution
    (2^-8); v in fp32 for half-precision weights: its average (β2 = 0.98, 0.999 in many recipes) moves 2% or 0.1%
    a step, at or below that resolution, so in bf16 it would lag or freeze (the torch reference's fused AdamW keeps
    both in bf16; MLX's v stays the finer); fp16 weights keep both in fp32 (fp16's range loses squared gradients)."""
    if weight not in (mx.bfloat16, mx.float16):
        return weight, weight
    first = mx.bfloat16 if weight == mx.bfloat16 and BF16_MOMENTS else mx.float32
    return first, mx.float32


def _zeroed(gradient: mx.array, finite: mx.array, own=lambda x: x) -> mx.array:
    """The (already scaled) gradient on a good step, 0 on a skipped one, whose scale is 0: what remains to clear is
    0 * inf and 0 * nan. On the CPU by an elementwise test, so no bool enters the fused update (g++ leaves a loop that
    reads one scalar: cpu_jit.py); on a good step it changes nothing, a finite gradient times a clip factor <= 1 being
    finite. On a GPU by the step's flag: one graph node per parameter, not three (its step is bound by host work)."""
    if on_cpu():
        zero = own(mx.array(0.0, gradient.dtype)).astype(gradient.dtype)
        return mx.where(mx.abs(gradient) < own(math.inf), gradient, zero)
    return mx.where(finite, gradient, 0.0)


def _state_at(state, dotted: str) -> dict:
    node = state
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def build_optimizer(model: CLIP, args, total_steps: int) -> GroupedAdamW:
    schedule = lr_schedule(args.lr, total_steps, args.warmup, args.schedule, args.min_lr_ratio)
    opt = GroupedAdamW(schedule, param_hparams(model, args.weight_decay, args.layer_decay),
                       betas=(args.beta1, args.beta2), eps=args.eps)
    opt.init(model.trainable_parameters())
    return opt


def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """CLIP clamps the learned temperature so exp(logit_scale) <= 100."""
    model.logit_scale = mx.clip(model.logit_scale, 0.0, math.log(max_scale))
