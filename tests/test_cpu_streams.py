"""Batch-parallel mode on the CPU (mlx_clip/cpu_streams.py): each tower's batch cut over CPU streams, MKL at one thread
per GEMM. The cut model must still be open_clip's CLIP: embeddings and the contrastive loss's gradients for every
parameter against open_clip's own autograd, compiled and not; the hand-written backward passes run on the stream of
their forward; the mode restores MKL's threads."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_clip import _blas, cpu_streams, fastmath
from mlx_clip.train.step import make_loss_fn

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from converters.open_clip import from_open_clip  # noqa: E402
from test_parity import inputs, open_clip_pair, rel  # noqa: E402

def _per_stream() -> int:
    return max(1, cpu_streams.cores() // len(cpu_streams.cpu_streams()))  # 1 on this 2-core machine


pytestmark = pytest.mark.skipif(len(cpu_streams.cpu_streams()) < 2 or _blas.get_threads() is None,
                                reason="needs 2+ CPU cores and MKL (batch-parallel mode stays off otherwise)")


def _torch_grads(ref, ours, images, ids):
    ref.zero_grad()
    img, txt, scale = ref(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(ids))
    loss = open_clip.loss.ClipLoss()(img, txt, scale)
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    # the gradients renamed and laid out as our parameters, by the same conversion the weights take
    converted = from_open_clip({**{k: v.detach().numpy() for k, v in ref.state_dict().items()}, **grads})
    laid_out = ours.sanitize({k: mx.array(v) for k, v in converted.items()})
    return loss.item(), {k: np.array(v) for k, v in laid_out.items()}


@pytest.mark.parametrize("compiled", [False, True])
def test_cut_batches_match_open_clip_embeddings_and_gradients(compiled):
    cfg, ref, ours = open_clip_pair("tiny")
    images, ids = inputs(cfg, batch=5)  # 5: unequal slices (2 + 3)
    want_loss, want = _torch_grads(ref.train(), ours, images, ids)
    with torch.no_grad():
        want_img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    clip_loss = make_loss_fn("clip")
    loss_fn = nn.value_and_grad(ours, lambda *batch: clip_loss(ours, *batch))
    if compiled:
        loss_fn = mx.compile(loss_fn, inputs=ours.state, outputs=ours.state)
    with cpu_streams.batch_parallel_mode() as on:
        assert on and _blas.get_threads() == _per_stream()
        got_img = np.array(ours.encode_image(mx.array(images)))
        loss, grads = loss_fn(mx.array(images), mx.array(ids.astype(np.int32)), mx.arange(5))
        mx.eval(loss, grads)
    assert rel(got_img, want_img) <= 1e-5
    assert abs(loss.item() - want_loss) <= 1e-5 * abs(want_loss)
    got = dict(tree_flatten(grads))
    assert len(got) > 20
    total = np.sqrt(sum(np.sum(w.astype(np.float64) ** 2) for w in want.values()))
    for name, g in got.items():
        if name.endswith("k_proj.bias"):  # exactly zero (softmax ignores a shift shared by all keys): round-off only
            assert max(np.linalg.norm(g), np.linalg.norm(want[name])) <= 1e-6 * total, name
        else:
            assert rel(np.array(g), want[name]) <= 1e-4, name


def test_mode_sets_and_restores_mkl_threads():
    before = _blas.get_threads()
    with cpu_streams.batch_parallel_mode() as on:
        assert on and cpu_streams.ENABLED and _blas.get_threads() == _per_stream()
        with cpu_streams.batch_parallel_mode(False) as inner:  # nested: latency work inside a throughput job
            assert not inner and _blas.get_threads() == before
        assert cpu_streams.ENABLED and _blas.get_threads() == _per_stream()
    assert not cpu_streams.ENABLED and _blas.get_threads() == before


def test_hand_written_backward_runs_on_its_forwards_stream():
    """Each custom VJP is built per stream: the function used under a stream is the one built for it, and a GELU's
    gradient taken under two streams equals the one taken on the default stream."""
    a, b = cpu_streams.cpu_streams()[:2]
    with mx.stream(a):
        fa = cpu_streams.for_current_stream(fastmath._softmax)
    with mx.stream(b):
        fb = cpu_streams.for_current_stream(fastmath._softmax)
    with mx.stream(a):
        assert cpu_streams.for_current_stream(fastmath._softmax) is fa and fa is not fb
    x = mx.random.normal((6, 40), key=mx.random.key(3))
    grad = mx.grad(lambda t: (fastmath.gelu(t) * t).sum())
    want = grad(x)
    with mx.stream(a):
        got = grad(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-7)


def test_in_own_shape_gives_each_stream_its_own_shape_and_the_same_numbers():
    # Equal broadcast constants on two streams would be merged by MLX's compiler into one node, read by the other
    # stream's fused kernel as a strided input; a shape per stream keeps them apart. The numbers must not change.
    x = mx.random.normal((3, 5), key=mx.random.key(0))
    seen = {}

    def fn(a, b):
        seen[len(seen)] = a.shape
        return a * 0.5 + b, a - b

    streams = cpu_streams.cpu_streams()
    outs = [cpu_streams.in_own_shape(s, fn, x, 2 * x) for s in [mx.default_stream(mx.cpu), *streams]]
    assert seen[0] == x.shape  # a stream outside the CPU streams keeps the shape
    assert len({seen[i] for i in range(1, len(seen))}) == len(streams)  # one shape per CPU stream
    assert all(np.prod(seen[i]) == x.size for i in seen)
    for first, second in outs:
        assert first.shape == second.shape == x.shape
        np.testing.assert_array_equal(np.array(first), np.array(x) * 0.5 + 2 * np.array(x))
        np.testing.assert_array_equal(np.array(second), -np.array(x))


def test_activation_gradient_on_two_streams_under_compile_equals_one_stream():
    # the batch-parallel shape of a step: each half on its own stream, the whole graph compiled
    x = mx.random.normal((64, 96), key=mx.random.key(1))
    g = mx.random.normal((64, 96), key=mx.random.key(2))

    def grad_of(act, parts):
        outs = []
        for i, stream in enumerate(parts):
            with mx.stream(stream):
                rows = slice(i * 64 // len(parts), (i + 1) * 64 // len(parts))
                outs.append(mx.vjp(act, [x[rows]], [g[rows]])[1][0])
        return mx.concatenate(outs)

    for act in (fastmath.gelu, fastmath.quick_gelu, fastmath.softmax):
        one = mx.compile(lambda: grad_of(act, [mx.default_stream(mx.cpu)]))()
        two = mx.compile(lambda: grad_of(act, cpu_streams.cpu_streams()[:2]))()
        np.testing.assert_allclose(np.array(two), np.array(one), rtol=1e-6, atol=1e-7)


def test_batch_parallel_mode_runs_in_a_thread_that_did_not_make_the_streams():
    """MLX binds a stream from mx.new_stream to the thread that made it, so each thread gets its own CPU streams: a
    batch cut over the streams in one thread, then in another (a server's model thread after training in the main
    one), gives the same embeddings as the whole batch. With streams shared across threads the second raised
    "There is no Stream(cpu, N) in current thread" (session 28)."""
    import threading

    from mlx_clip.config import get_config
    from mlx_clip.model import CLIP

    mx.random.seed(0)
    model = CLIP(get_config("tiny"))
    size = model.config.vision_config.image_size
    x = mx.random.normal((4, size, size, 3), key=mx.random.key(1))
    whole = np.array(model.encode_image(x))
    got = {}

    def cut(name):
        try:
            with cpu_streams.batch_parallel_mode():
                assert cpu_streams.groups_for(4) == len(cpu_streams.cpu_streams()) > 1
                got[name] = np.array(cpu_streams.split_batch(model.encode_image, x))
        except Exception as e:  # noqa: BLE001  (reported by the assertion below, with its message)
            got[name] = e

    cut("main")
    thread = threading.Thread(target=cut, args=("other",))
    thread.start()
    thread.join(60)
    for name in ("main", "other"):
        assert not isinstance(got[name], Exception), (name, got[name])
        np.testing.assert_allclose(got[name], whole, rtol=1e-5, atol=1e-6)
    assert cpu_streams.cpu_streams() is cpu_streams.cpu_streams()  # made once per thread
