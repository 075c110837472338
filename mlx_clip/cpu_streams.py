"""Spread work over the CPU's cores as independent MLX streams: the optimizer update always, and in batch-parallel mode
each tower's batch, one slice per core.

MLX runs every elementwise kernel and reduction of one stream on one thread; only BLAS is multi-threaded. Independent
work placed on several CPU streams runs on several threads at once (measured 1.8x on an elementwise chain on 2 cores).
AdamW over 151 M ViT-B/32 parameters is such work: a pure memory pass (`Spread`).

A tower's forward and backward are mostly GEMMs, which MKL already spreads over every core, plus single-threaded
elementwise work (~40% on top of the GEMMs for ViT-B/32, about as much as the GEMMs for `small`). Batch-parallel mode
(`batch_parallel`) gives each core a slice of the batch on its own stream and MKL one thread per GEMM: the GEMMs keep
their throughput and the elementwise work runs on every core. (Streams are capped at 4; a machine with more cores gives
each stream's GEMMs cores / streams threads. Measured on 2 cores only.) Without the MKL change it is a loss: two streams
of 2-thread GEMMs oversubscribe the cores (MKL's idle threads spin). So the mode is for throughput work where every
tower call has a batch to cut (training, batch embedding), switched on by those entry points; latency work (one image at
a time) keeps MKL's threads on each GEMM. On a GPU these helpers hand back the default stream.
"""

from __future__ import annotations

import contextlib
import os
import threading

import mlx.core as mx

from mlx_clip import _blas
from mlx_clip.switches import env_switch

# Per thread: MLX (0.32) binds a stream from mx.new_stream to the thread that made it ("There is no Stream(cpu, 1) in
# current thread" elsewhere), and a process may run the model on more than one thread (the server's model thread after
# a training run in the main one: found in session 28's test suite, after a bench test left this mode on)
_LOCAL = threading.local()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def on_cpu() -> bool:
    """Whether the default device is the CPU; read when a graph is traced, so CPU-only code paths are chosen then."""
    return mx.default_device() == mx.cpu


def cpu_streams() -> list:
    """One CPU stream per core (at most 4), made once per thread; [] when the default device is not the CPU."""
    if not on_cpu():
        return []
    if getattr(_LOCAL, "streams", None) is None:
        _LOCAL.streams = [mx.new_stream(mx.cpu) for _ in range(max(1, min(cores(), 4)))]
    return _LOCAL.streams


class Spread:
    """Puts each job on the least-loaded CPU stream, load counted in elements (greedy, in call order); with
    `active` false (or one stream) every job stays on the current stream."""

    def __init__(self, active: bool = True):
        self.streams = cpu_streams() if active else []
        self.load = [0] * len(self.streams)

    def stream_for(self, size: int):
        if len(self.streams) < 2:
            return contextlib.nullcontext()
        i = min(range(len(self.load)), key=self.load.__getitem__)
        self.load[i] += size
        return mx.stream(self.streams[i])


_BUILT: dict = {}


def for_current_stream(factory, *key):
    """factory(stream, *key) for the stream current now, built once per (stream, key).

    MLX runs a hand-written VJP (mx.custom_function) on the stream current when the backward is traced, the default
    one, not on the stream its forward ran on; built-in ops differentiate on their own stream. So a function with a
    hand-written VJP is built per stream and runs its VJP inside `mx.stream(stream)`, or the backward of work split
    over streams would all queue on one thread.
    """
    stream = mx.default_stream(mx.default_device())
    k = (factory, str(stream), *key)  # str: Stream hashes by object identity, and each lookup makes a new object
    if k not in _BUILT:
        _BUILT[k] = factory(stream, *key)
    return _BUILT[k]


def in_own_shape(stream, fn, *arrays: mx.array):
    """fn(*arrays) traced with leading length-1 axes that only `stream` uses, its result (an array or a tuple of them,
    each the first array's size) handed back in the first array's shape: a free reshape either way.

    Why: MLX's compiler merges equal nodes, and a constant broadcast to one shape is the same node on every stream
    (mlx/compile.cpp's `array_equivalent` does not compare streams). After the merge, the other stream's fused kernel
    reads it as an input from another stream: a stride-0 array among its inputs, so the strided, unvectorised variant
    of the kernel runs. In batch-parallel mode the slices have equal shapes, so every polynomial kernel of both
    slices (GELU, softmax) and AdamW's update of equal-shaped (large: optim.FUSED_UPDATE_MAX) parameters on two
    streams ran that way. A shape of its own per stream keeps those broadcasts apart. With fastmath's kernel
    boundaries, alternating processes: ViT-B-32 b16 train step 3,996 / 3,984 / 3,856 -> 3,775 / 3,795 / 3,705 ms,
    `small` b32 438 / 418 / 400 -> 393 / 352 / 376 ms."""
    streams = [str(s) for s in (getattr(_LOCAL, "streams", None) or [])]  # this thread's, where made
    k = streams.index(str(stream)) + 1 if str(stream) in streams else 0
    return with_leading_axes(k, fn, *arrays)


def with_leading_axes(k: int, fn, *arrays: mx.array):
    """fn(*arrays) traced with k leading length-1 axes, its result handed back in the first array's shape (free
    reshapes); k = 0 calls fn as it is. The reshapes also cut a compiled fn's outputs apart: each is then made by a
    kernel of its own, which MLX lets write over an input nothing else holds. A kernel of several outputs gets such
    inputs only in input order, item size matching (mlx/backend/common/compiled.cpp), so some of its outputs may be
    allocated anew while the old arrays live (train.optim.FUSED_UPDATE_MAX, GPU_INPLACE_UPDATE)."""
    if k == 0:
        return fn(*arrays)
    lead, shape = (1,) * k, arrays[0].shape
    out = fn(*(a.reshape(lead + a.shape) for a in arrays))
    return tuple(o.reshape(shape) for o in out) if isinstance(out, tuple) else out.reshape(shape)


_MKL_THREADS = 0  # MKL's thread count before batch-parallel mode, restored when it ends
ENABLED = False  # batch-parallel mode: read when a graph is traced (split_batch); set by batch_parallel
ALLOWED = env_switch("MLXCLIP_CPU_SPLIT", True)


def batch_parallel(on: bool = True) -> bool:
    """Switch batch-parallel mode (module docstring) and MKL's threads with it; returns whether it is on. Stays off
    on a GPU, with one core, with MLXCLIP_CPU_SPLIT=0, or when the BLAS's threads cannot be set (not MKL)."""
    global ENABLED, _MKL_THREADS
    want = on and ALLOWED and len(cpu_streams()) > 1
    if want == ENABLED:
        return ENABLED
    if want:
        before = _blas.get_threads()
        # the cores shared out between the streams' GEMMs, none oversubscribed (1 thread each on 2 cores)
        if before and _blas.set_threads(max(1, cores() // len(cpu_streams()))):
            ENABLED, _MKL_THREADS = True, before
    else:
        _blas.set_threads(_MKL_THREADS)
        ENABLED = False
    return ENABLED


def split_batch(fn, x: mx.array) -> mx.array:
    """fn(x) with the batch cut into one slice per CPU stream, the slices run at once (their backward too: each
    op's gradient runs on the stream of the op). fn must treat samples independently."""
    n, k = x.shape[0], groups_for(x.shape[0])
    if k == 1:  # a batch of one stays whole (MKL has one thread then: batch_parallel says why)
        return fn(x)
    bounds = [n * i // k for i in range(k + 1)]
    outs = []
    for i, stream in enumerate(cpu_streams()[:k]):
        with mx.stream(stream):
            outs.append(fn(x[bounds[i]:bounds[i + 1]]))
    return mx.concatenate(outs)


def split_groups(fn, groups: dict) -> mx.array:
    """fn(group) for each group of a dict of (G, ...) arrays (tokenizer.pack_rows), each group on its own CPU stream in
    batch-parallel mode, the results concatenated in group order."""
    count = next(iter(groups.values())).shape[0]
    streams = cpu_streams() if ENABLED else []
    outs = []
    for i in range(count):
        with mx.stream(streams[i]) if count <= len(streams) else contextlib.nullcontext():
            outs.append(fn({k: v[i:i + 1] for k, v in groups.items()}))
    return mx.concatenate(outs)


def groups_for(batch: int) -> int:
    """How many slices `split_batch` cuts a batch of `batch` rows into now (what `split_groups` should be given)."""
    streams = cpu_streams() if ENABLED else []
    return 1 if len(streams) < 2 or batch < 2 else min(len(streams), batch)


@contextlib.contextmanager
def batch_parallel_mode(on: bool = True):
    """batch_parallel(on) for the body, the previous mode (and MKL's threads) restored after it."""
    before = ENABLED
    batch_parallel(on)
    try:
        yield ENABLED
    finally:
        batch_parallel(before)
