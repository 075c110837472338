"""`mlxclip parity` / `mlxclip bench` and the torch reference behind them (torch_ref.model).

The reference is open_clip's own model and torch.optim.AdamW; what is checked here is that the mirror is faithful
(parameter groups, schedule, exported checkpoints) and that the commands report what they claim, including a failure
when the MLX side is wrong. The full-size runs (`small` and ViT-B-32 over 100 steps) are marked slow.
"""

import json
import math
import os
from types import SimpleNamespace

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from benchmarks.parity import parity
from cli_util import invoke
from mlx_clip import cli, cpu_jit
from mlx_clip.config import get_config
from mlx_clip.io import save
from mlx_clip.memory import one_step_limit
from mlx_clip.model import CLIP, init_weights
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import lr_schedule, param_hparams
from torch_ref.model import TorchCLIP, build_model, load_exported, lr_at, lr_tensor, our_names, param_groups


# --- the torch mirror ------------------------------------------------------------------------------------------------


def test_param_groups_match_mlx_hparams():
    """Every open_clip parameter lands in the (lr scale, weight decay) group that mlx_clip gives its converted name."""
    cfg = get_config("tiny")
    mine = param_hparams(CLIP(cfg), weight_decay=0.2, layer_decay=0.7)
    ref = build_model(cfg, device="cpu")
    groups = param_groups(ref, cfg, weight_decay=0.2, layer_decay=0.7)
    by_tensor = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    covered = set()
    for name, p in ref.named_parameters():
        for ours in our_names(name):
            assert by_tensor[id(p)] == pytest.approx(mine[ours]), name
            covered.add(ours)
    assert covered == set(mine)
    assert sum(len(g["params"]) for g in groups) == len(list(ref.parameters()))
    assert {g["weight_decay"] for g in groups} == {0.0, 0.2} and len({g["lr_scale"] for g in groups}) == 4


@pytest.mark.parametrize("kind,warmup,floor", [("cosine", 5, 0.0), ("cosine", 0, 0.1), ("const", 3, 0.0)])
def test_lr_matches_mlx_schedule(kind, warmup, floor):
    args = TrainingArgs(lr=3e-4, warmup=warmup, schedule=kind, min_lr_ratio=floor)
    schedule = lr_schedule(args.lr, 40, warmup, kind, floor)
    for step in range(45):
        # MLX evaluates the schedule in float32: agree to float32 rounding of the peak LR.
        assert lr_at(step, args, 40) == pytest.approx(schedule(step).item(), rel=1e-6, abs=1e-6 * args.lr)


def test_exported_checkpoint_loads_and_encodes_the_same(tmp_path):
    cfg = get_config("tiny")
    model = init_weights(CLIP(cfg), seed=5)
    save(model, None, tmp_path / "m")
    invoke("export", "--model", tmp_path / "m", "--to", "open_clip", "--out", tmp_path / "oc.safetensors")
    ref_model, ref_cfg = load_exported(tmp_path / "oc.safetensors", device="cpu")
    assert ref_cfg.vision_config == cfg.vision_config and ref_cfg.text_config == cfg.text_config
    ref = TorchCLIP(ref_model, ref_cfg)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    ids = np.zeros((2, 77), np.int32)
    ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, rng.integers(1, 49405, (2, 3)), 49407
    theirs = ref.encode_image(images, normalize=True).numpy()
    mine = np.array(model.encode_image(mx.array(images), normalize=True))
    assert np.linalg.norm(mine - theirs) / np.linalg.norm(theirs) < 1e-5
    logits, _ = ref(images, ids)
    mine_logits, _ = model(mx.array(images), mx.array(ids))
    assert np.allclose(np.array(mine_logits), logits.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_train_step_skips_non_finite_and_clamps(fused):
    """Both guards: the host's (a sync, then no update) and the fused optimizer's on the device (found_inf)."""
    cfg = get_config("tiny")
    ref = TorchCLIP(build_model(cfg, device="cpu"), cfg, TrainingArgs(lr=1e-3), total_steps=10, fused=fused)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
    ids = np.zeros((4, 77), np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2] = 49406, np.arange(1, 5), 49407
    with torch.no_grad():
        ref.model.logit_scale.fill_(math.log(100.0) + 0.5)  # above the clamp: the step must bring it back
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    _, _, applied = ref.train_step(bad, ids)  # a skipped step leaves everything, the out-of-range scale too
    assert not applied and ref.step == 0 and ref.model.logit_scale.item() == pytest.approx(math.log(100.0) + 0.5)
    loss, norm, applied = ref.train_step(images, ids)
    assert applied and math.isfinite(loss.item()) and ref.step == 1
    assert ref.model.logit_scale.item() == pytest.approx(math.log(100.0))
    before = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    _, _, applied = ref.train_step(bad, ids)
    assert not applied and ref.step == 1
    assert all(torch.equal(before[n], p) for n, p in ref.model.named_parameters())


# --- mlxclip parity --------------------------------------------------------------------------------------------------


def test_parity_command_tiny(tmp_path):
    out = tmp_path / "parity"
    result = invoke("parity", "--arch", "tiny", "--steps", 6, "--batch", 8, "--device", "cpu", "--control", "--out", out)
    assert "PASS" in result.output
    report = json.loads((out / "parity.json").read_text())
    assert (out / "parity.png").stat().st_size > 10_000 and "all bars pass" in (out / "parity.md").read_text()
    cfg = get_config("tiny")
    names = [r["name"] for r in report["stages"] if r["stage"] == "hidden states"]
    assert len(names) == cfg.vision_config.num_hidden_layers + cfg.text_config.num_hidden_layers + 2
    stages = {"tokens", "pixels", "hidden states", "embeddings", "logits", "loss"}
    assert {r["stage"] for r in report["stages"]} == stages
    graded = {r["name"].split(" ")[0] for r in report["gradients"]}
    assert graded == {k for k, _ in nn.utils.tree_flatten(CLIP(cfg).parameters())}  # every parameter
    assert all(r["pass"] for r in report["stages"] + report["gradients"])
    assert max(r["value"] for r in report["stages"] if r["stage"] == "embeddings") <= 1e-5
    assert max(r["value"] for r in report["gradients"]) <= 1e-4
    train = report["training"]
    assert len(train["loss_mlx"]) == len(train["loss_torch"]) == 6 and train["max_loss_rel_diff"] <= 1e-3
    assert train["loss_mlx"][-1] < train["loss_mlx"][0]  # it trains
    assert train["parameter_distance"]["rel_to_update"] < 1e-3
    # The control (torch against itself, nudged by one rounding) stays at rounding level too.
    assert len(train["loss_control"]) == 6 and train["max_control_rel_diff"] < 1e-4


def test_parity_catches_a_wrong_activation(tmp_path, monkeypatch):
    """Swap the MLX model's exact GELU for the tanh approximation: the hidden states must fail their bar."""
    from mlx_clip import model as model_module

    monkeypatch.setitem(model_module.ACTIVATIONS, "gelu", nn.gelu_approx)
    report = parity("tiny", steps=2, device="cpu", out=None, batch=4, log=lambda m: None)
    assert report["passed"] is False
    failing = {r["stage"] for r in report["stages"] if r["pass"] is False}
    assert {"hidden states", "embeddings"} <= failing
    before_blocks = [r for r in report["stages"] if r["name"] in ("vision after ln_pre", "text embeddings")]
    assert len(before_blocks) == 2 and all(r["pass"] for r in before_blocks)


def test_bf16_is_reported_without_bars():
    report = parity("tiny", steps=2, device="cpu", out=None, batch=4, dtype="bfloat16", log=lambda m: None)
    assert report["passed"] is None and report["bars"] is None
    emb = [r["value"] for r in report["stages"] if r["stage"] == "embeddings"]
    assert all(0 < e < 0.1 for e in emb)  # looser than fp32, still the same function


@pytest.mark.slow
@pytest.mark.parametrize("arch,batch,lr", [("small", 16, 1e-4), ("ViT-B-32", 8, 1e-5)])
def test_parity_100_steps(tmp_path, arch, batch, lr):
    """The committed benchmarks/results/parity-* runs. ViT-B-32 at lr 1e-5: at 1e-4 and batch 8 from scratch its loss
    jumped about (0.82 at step 10, 1.36 at step 20) and the difference, 3e-5 at step 10, was 2e-4 by step 20.
    About an hour on 2 shared cores."""
    report = parity(arch, steps=100, device="cpu", out=tmp_path, batch=batch, lr=lr, log=lambda m: None)
    assert report["passed"], "\n".join(json.dumps(r) for r in report["stages"] if r["pass"] is False)


# --- mlxclip bench ---------------------------------------------------------------------------------------------------


def test_the_device_guard_steps_as_the_host_guard_does():
    """The fused optimizer's sync-free guarded step (CUDA's path, run here on the CPU) against the reference loop's:
    the same parameters step by step through a warm-up, the cosine schedule, clipping and a skipped non-finite step,
    the same applied flags and step count, and its LR on the device equal to lr_at's."""
    cfg = get_config("tiny")
    args = TrainingArgs(lr=1e-3, warmup=2, schedule="cosine", min_lr_ratio=0.1, grad_clip=0.5)
    refs = [TorchCLIP(build_model(cfg, device="cpu", seed=3), cfg, args, total_steps=6, fused=f) for f in (False, True)]
    rng = np.random.default_rng(2)
    ids = np.zeros((4, 77), np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2] = 49406, np.arange(1, 5), 49407
    for step in range(6):
        images = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
        if step == 2:
            images[1, 3, 3, 0] = np.inf
        outs = [r.train_step(images, ids) for r in refs]
        assert [bool(o[2]) for o in outs] == [step != 2] * 2
        assert refs[0].step == refs[1].step == step + (step < 2)
        # The fused kernel rounds differently (1 ulp after a step), and Adam turns a gradient's rounding into up to
        # lr * dg / eps where the gradient is near eps (~1e-4 of lr here). A wrong LR or an update on the skipped
        # step moves parameters by ~lr (1e-3): 1% of lr tells the two apart.
        for (name, a), b in zip(refs[0].model.named_parameters(), refs[1].model.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-2 * args.lr), (step, name, (a - b).abs().max().item())
    for s in range(0, 9):
        for schedule in ("cosine", "const"):
            a = TrainingArgs(lr=3e-4, warmup=3, schedule=schedule, min_lr_ratio=0.2)
            assert lr_tensor(torch.tensor(s), a, 8).item() == pytest.approx(lr_at(s, a, 8), rel=1e-6), (s, schedule)


def test_bench_json_lines(tmp_path, capsys):
    cli.main(["bench", "--arch", "tiny", "--backend", "mlx,torch", "--task", "embed-text", "--mode", "eager",
              "--batch", "4", "--runs", "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path), "--json"],
             standalone_mode=False)
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]  # stdout is JSON lines only
    assert {(r["backend"], r["batch"]) for r in records} == {("mlx", 1), ("mlx", 4), ("torch", 1), ("torch", 4)}
    for r in records:
        assert {"backend", "mode", "task", "device", "dtype", "batch", "items_per_s", "peak_mem_bytes"} <= set(r)
        assert r["mode"] == "eager" and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["items_per_s"] == pytest.approx(r["batch"] / r["median_s"]) and r["peak_mem_bytes"] > 0
    stem = tmp_path / "bench-cpu-tiny-float32-b4"
    assert len(stem.with_suffix(".jsonl").read_text().splitlines()) == 4
    assert "MLX / torch" in stem.with_suffix(".md").read_text() and stem.with_suffix(".png").exists()
    # the machine line says how MLX's CPU kernels were built
    assert f"MLX CPU kernel flags (`mlx_clip/cpu_jit.py`): {cpu_jit.STATUS};" in \
        stem.with_suffix(".md").read_text()


def test_bench_train_reports_mlx_host_time(tmp_path, capsys):
    """MLX's train rows carry each timed run's host time (CPU time of the calling thread until the step is queued):
    one per timed run, each within its run's wall time; torch's rows have none; the report names it."""
    cli.main(["bench", "--arch", "tiny", "--backend", "mlx,torch", "--task", "train", "--mode", "compiled",
              "--batch", "2", "--runs", "3", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path), "--json"],
             standalone_mode=False)
    records = {r["backend"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    mlx_rec = records["mlx"]
    assert len(mlx_rec["host_s"]) == len(mlx_rec["times_s"]) == 3
    assert all(0 < h <= t for h, t in zip(mlx_rec["host_s"], mlx_rec["times_s"]))
    assert mlx_rec["host_ms_p50"] == pytest.approx(1e3 * sorted(mlx_rec["host_s"])[1])
    assert "host_s" not in records["torch"]
    report = (tmp_path / "bench-cpu-tiny-float32-b2.md").read_text()
    assert f"{mlx_rec['host_ms_p50']:.1f} ms of a {mlx_rec['latency_ms_p50']:.1f} ms step" in report
    # both backends' rows carry the host core's pace around their timed runs (benchmarks.host_pace), the table shows it
    for r in records.values():
        assert len(r["host_probe_ms"]) == 6 and all(p > 0 for p in r["host_probe_ms"])  # three before, three after
        assert r["host_probe_ms_p50"] == pytest.approx(sum(sorted(r["host_probe_ms"])[2:4]) / 2)
        probes = r["host_probe_ms"]
        assert f"| {r['host_probe_ms_p50']:.2f} ({min(probes):.2f}-{max(probes):.2f}) |" in report
    # MFU: the model's FLOPs per training pair at the row's items/s over the matmul rate measured in this run, the
    # same peak and FLOP count for both backends
    from benchmarks import flops

    peaks = {r["matmul_peak_tflops"] for r in records.values()}
    assert len(peaks) == 1 and peaks.pop() > 0
    for r in records.values():
        assert r["model_flops_per_item"] == flops.per_item(get_config("tiny"), "train", 2)
        assert r["model_tflops_per_s"] == pytest.approx(r["model_flops_per_item"] * r["items_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / r["matmul_peak_tflops"])
        assert f"| train | 2 | {r['backend']} | compiled | " in report and f"{100 * r['mfu']:.1f}% |" in report
    assert "## Model FLOP utilisation" in report and "2048×2048 float32 matmul rate" in report


def test_bench_steps_per_run_queues_train_steps_and_reports_per_step(tmp_path, capsys):
    """--steps-per-run k: each timed train run queues k steps and waits for the last; the times are per step (MLX's host time
    too: one per step), the rows and the report say so; the CPU default is 1 (host and computation share cores)."""
    common = ["bench", "--arch", "tiny", "--backend", "mlx,torch", "--task", "train", "--mode", "compiled",
              "--batch", "2", "--runs", "2", "--warmup", "1", "--device", "cpu", "--json"]
    cli.main([*common, "--steps-per-run", "3", "--out", str(tmp_path)], standalone_mode=False)
    records = {r["backend"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert {r["steps_per_run"] for r in records.values()} == {3}
    assert len(records["mlx"]["host_s"]) == 6 and len(records["mlx"]["times_s"]) == 2
    assert "each timed run queues 3 steps back to back" in (tmp_path / "bench-cpu-tiny-float32-b2.md").read_text()
    cli.main(common, standalone_mode=False)
    assert {json.loads(line)["steps_per_run"] for line in capsys.readouterr().out.strip().splitlines()} == {1}
    with pytest.raises(ValueError, match="steps_per_run must be >= 1"):
        cli.main([*common, "--steps-per-run", "0"], standalone_mode=False)


def test_queued_train_steps_read_each_loss_once_the_next_is_queued(monkeypatch):
    """As mlxclip's training loop does (train.loop.train: step s + 1 queued, then step s read), both backends' bench
    workloads read a step's loss only once the next step is queued, so the host runs at most a step ahead (and, on
    CUDA, MLX's buffers with it: they are freed when their command buffer completes); the last step waits at the end."""
    from benchmarks import workloads_mlx, workloads_torch
    from mlx_clip import cpu_streams
    from mlx_clip.train import loop
    from torch_ref import model as torch_model

    events = []
    load = workloads_mlx.mlx_workload(get_config("tiny"), "train", 2, "compiled", "float32", words=(3, 5))
    real_queue = loop.queue

    class Mx:  # mlx.core as the workload sees it, its evaluations logged (loop.queue keeps the real one)
        def __getattr__(self, name):
            return getattr(mx, name)

        def eval(self, *a):
            events.append(("read", id(a[0])))
            mx.eval(*a)

        def async_eval(self, *a):
            events.append(("last", id(a[0])))
            mx.async_eval(*a)

    monkeypatch.setattr(loop, "queue", lambda *out, state: (events.append(("queue", id(out[0]))),
                                                            real_queue(*out, state=state)))
    monkeypatch.setattr(workloads_mlx, "mx", Mx())
    with cpu_streams.batch_parallel_mode(cpu_streams.ENABLED):  # the workload sets the CPU's mode: put back after
        load.run_steps(3)
    kinds = [kind for kind, _ in events]
    assert kinds == ["queue", "queue", "read", "last", "read", "read"], kinds
    assert events[2][1] == events[0][1] and events[4][1] == events[1][1]  # step 0's loss after step 1 is queued, ...
    assert events[5][1] == events[3][1]  # ... and the last step's at the end

    class Loss:  # a step's loss whose read is logged (the torch step itself is replaced: the loop is what is tested)
        def __init__(self, step):
            self.step = step

        def item(self):
            events.append(("read", self.step))

    steps = iter(range(3))
    monkeypatch.setattr(torch_model.TorchCLIP, "train_step_on",
                        lambda self, pixels, tokens: (events.append(("queue", s := next(steps))), (Loss(s), None, None))[1])
    monkeypatch.setattr(workloads_torch, "synchronize", lambda device: events.append(("last", None)))
    events.clear()
    workloads_torch.torch_workload(get_config("tiny"), "train", 2, "eager", "float32", "cpu", words=(3, 5)).run_steps(3)
    assert events == [("queue", 0), ("queue", 1), ("read", 0), ("queue", 2), ("read", 1), ("last", None)], events


def test_measure_times_each_iteration_of_a_multi_step_run(monkeypatch):
    from benchmarks import bench_worker

    clock = [0.0]
    monkeypatch.setattr(bench_worker, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def run():  # four steps of 0.25 s each, one after another
        clock[0] += 4 * 0.25

    timing = bench_worker.measure(run, warmup=2, runs=3, per_run=4)
    assert timing["times_s"] == [0.25] * 3 and timing["median_s"] == 0.25
    assert timing["first_run_s"] == 1.0  # the first call whole: it pays for compilation
    phases = []
    bench_worker.measure(run, warmup=2, runs=3, per_run=4, mark=phases.append)
    assert phases == ["build", "first_run", "warmup", "timed", "timed", "timed"]


def test_the_peak_is_split_by_phase_and_the_row_keeps_the_highest():
    """MLX's allocator peak per phase: a first run that holds 64 MB once (as compilation or state made on first use
    can) shows in its phase and in the row's peak, not in the timed runs'; each timed run's own peak is listed."""
    from benchmarks import bench_worker
    from benchmarks.bench_report import phase_note

    calls = []

    def run():
        calls.append(1)
        mx.eval((mx.zeros((16 << 20 if len(calls) == 1 else 1 << 20,)) + 1).sum())  # 64 MB, then 4 MB

    memory = bench_worker._Memory({"backend": "mlx", "device": "cpu"})
    memory.reset()
    bench_worker.measure(run, warmup=2, runs=3, mark=memory.mark)
    got = memory.read()
    phases, timed = got["peak_by_phase_bytes"], got["peak_timed_runs_bytes"]
    assert phases["first_run"] >= 64 << 20 and len(timed) == 3 and phases["timed"] == max(timed)
    assert 4 << 20 <= max(timed) < 32 << 20 and phases["warmup"] < 32 << 20
    assert got["mlx_allocator_peak_bytes"] == max(phases.values()) >= 64 << 20
    assert phase_note({"peak_by_phase_bytes": phases, "peak_mem_source": "mx.get_peak_memory"}).startswith(
        f" (first run {phases['first_run'] / 2**20:.0f}, ")
    assert phase_note(dict(got, peak_by_phase_bytes=phases)) == ""  # the CPU row's peak is the resident set's


def test_bench_runs_accumulate_in_one_table(tmp_path, capsys):
    """A second run with another task adds its rows; a task measured again replaces its own rows only. Captions set
    with --caption-tokens name the files and reach both backends (MLX trims the padding, so its text rows are short)."""
    common = ["bench", "--arch", "tiny", "--backend", "mlx", "--mode", "eager", "--batch", "2", "--runs", "1",
              "--warmup", "1", "--device", "cpu", "--out", str(tmp_path), "--json", "--caption-tokens", "4-6"]
    cli.main([*common, "--task", "embed-text"], standalone_mode=False)
    cli.main([*common, "--task", "embed-image"], standalone_mode=False)
    cli.main([*common, "--task", "embed-text"], standalone_mode=False)
    capsys.readouterr()
    path = tmp_path / "bench-cpu-tiny-float32-b2-captions4-6.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["task"], r["batch"]) for r in records) == [("embed-image", 1), ("embed-image", 2),
                                                                  ("embed-text", 1), ("embed-text", 2)]
    assert {r["caption_tokens"] for r in records} == {"4-6"}
    assert "4-6 word tokens" in path.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="caption-tokens"):
        cli.main([*common[:-1], "9-3", "--task", "embed-text"], standalone_mode=False)


def test_bench_memory_limit_reaches_the_mlx_worker(tmp_path, capsys):
    """--memory-limit sets MLX's limit in the measuring process (read back from MLX there) and names it beside the
    peak; a size that is not one is refused before anything runs."""
    common = ["bench", "--arch", "tiny", "--backend", "mlx", "--mode", "eager", "--batch", "2", "--runs", "1",
              "--warmup", "1", "--device", "cpu", "--task", "embed-image", "--json"]
    cli.main([*common, "--memory-limit", "1.5GiB", "--out", str(tmp_path)], standalone_mode=False)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records and all(r["mlx_memory_limit_bytes"] == int(1.5 * 2**30) for r in records)
    assert all(r["peak_mem_source"].endswith("(limit 1.5 GiB)") for r in records)
    assert "(limit 1.5 GiB)" in (tmp_path / "bench-cpu-tiny-float32-b2.md").read_text()
    cli.main(common, standalone_mode=False)  # no limit: MLX's own, nothing recorded
    assert all("mlx_memory_limit_bytes" not in json.loads(line)
               for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    with pytest.raises(ValueError, match="memory size '19 gigs': expected a number with a unit"):
        cli.main([*common, "--memory-limit", "19 gigs"], standalone_mode=False)


def test_bench_memory_limit_auto_is_set_from_one_measured_run(capsys):
    """--memory-limit auto: each MLX process sets its limit from one un-queued run's peak and a tenth more: set (under
    MLX's own), within a tenth of the row's peak, which still counts the compiling run, and named as auto."""
    common = ["bench", "--arch", "tiny", "--backend", "mlx", "--mode", "eager", "--batch", "2", "--runs", "1",
              "--warmup", "1", "--device", "cpu", "--task", "embed-image", "--json"]
    cli.main([*common, "--memory-limit", "auto"], standalone_mode=False)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert records
    for r in records:
        assert 0 < r["mlx_memory_limit_bytes"] <= 1.1 * r["mlx_allocator_peak_bytes"] + 1
        assert r["mlx_memory_limit_bytes"] == one_step_limit(r["peak_by_phase_bytes"]["limit_probe"])
        assert r["mlx_memory_limit_bytes"] < mx.get_memory_limit()  # this process's: MLX's own default
        assert r["peak_mem_source"].endswith(" GiB, auto)")


def _fake_record(spec: dict, v: float) -> dict:
    """What bench_worker measures for `spec`, made up: v items/s (the best run v + 1), peak memory int(v) bytes."""
    b = spec["batch"]
    return dict(spec, items_per_s=v, items_per_s_best=v + 1, latency_ms_p50=1e3 * b / v, median_s=b / v,
                min_s=b / (1.1 * v), max_s=b / (0.9 * v), spread_pct=1.0, first_run_s=1.0, peak_mem_bytes=int(v),
                peak_mem_source="test", load_avg=[0.0])


def test_bench_rounds_take_turns_and_report_the_median_round(tmp_path, capsys, monkeypatch):
    """--rounds N runs every measurement N times, the backends alternating first, and keeps the median round."""
    import benchmarks.bench as bench_module

    order, speeds = [], iter([10.0, 4.0, 30.0, 6.0, 20.0, 5.0])  # mlx, torch; torch, mlx; mlx, torch (items/s)

    def fake_run_one(spec):
        order.append(spec["backend"])
        return [_fake_record(spec, next(speeds))], None

    monkeypatch.setattr(bench_module, "run_one", fake_run_one)
    cli.main(["bench", "--arch", "tiny", "--backend", "mlx,torch", "--task", "train", "--mode", "compiled",
              "--batch", "2", "--device", "cpu", "--rounds", "3", "--json", "--out", str(tmp_path)],
             standalone_mode=False)
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert order == ["mlx", "torch", "torch", "mlx", "mlx", "torch"]
    got = {r["backend"]: r for r in records}
    assert got["mlx"]["round_items_per_s"] == [10.0, 6.0, 20.0] and got["mlx"]["items_per_s"] == 10.0
    assert got["torch"]["round_items_per_s"] == [4.0, 30.0, 5.0] and got["torch"]["items_per_s"] == 5.0
    assert got["mlx"]["peak_mem_bytes"] == 20 and got["torch"]["items_per_s_best"] == 31.0
    assert "## Rounds" in (tmp_path / "bench-cpu-tiny-float32-b2.md").read_text()


def test_bench_names_rows_that_ran_at_different_host_paces(tmp_path, capsys, monkeypatch):
    """The ratio line and the report say when MLX's and torch's rows ran at host paces more than PACE_GAP apart (the
    machine's speed then moved between them), and say nothing when they agree."""
    import benchmarks.bench as bench_module
    from benchmarks.bench_report import PACE_GAP

    def run(paces):
        it = iter(paces)

        def fake_run_one(spec):
            return [dict(_fake_record(spec, 10.0), host_probe_ms_p50=next(it))], None

        monkeypatch.setattr(bench_module, "run_one", fake_run_one)
        cli.main(["bench", "--arch", "tiny", "--backend", "mlx,torch", "--task", "train", "--mode", "compiled",
                  "--batch", "2", "--device", "cpu", "--out", str(tmp_path / str(paces[0]))], standalone_mode=False)
        return capsys.readouterr().out, (tmp_path / str(paces[0]) / "bench-cpu-tiny-float32-b2.md").read_text()

    out, report = run([8.0, 5.0])  # 1.6x apart
    assert "MLX/torch train batch 2: eager —, compiled 1.00×, best vs best 1.00× (host pace differed: mlx 8.00 ms, " \
           "torch 5.00 ms)" in out
    assert "train batch 2: host pace differed: mlx 8.00 ms, torch 5.00 ms" in report
    out, report = run([5.0 * PACE_GAP * 0.99, 5.0])  # within the gap
    assert "host pace differed" not in out and "host pace differed" not in report


def test_bench_names_the_switches_it_ran_under(tmp_path, capsys, monkeypatch):
    """The MLX_* and MLXCLIP_* variables set when `mlxclip bench` runs are named in its report and in every JSON row
    (a result measured with an opt-in kernel or other command-buffer sizes says so); none set is said too."""
    import benchmarks.bench as bench_module

    monkeypatch.setattr(bench_module, "run_one", lambda spec: ([_fake_record(spec, 10.0)], None))
    for name in [k for k in os.environ if k.startswith(("MLX_", "MLXCLIP_"))]:
        monkeypatch.delenv(name)
    args = ["bench", "--arch", "tiny", "--backend", "mlx", "--task", "embed-text", "--mode", "eager", "--batch", "2",
            "--device", "cpu", "--json", "--out", str(tmp_path)]
    cli.main(args, standalone_mode=False)
    report = (tmp_path / "bench-cpu-tiny-float32-b2.md").read_text()
    assert "Settings (environment): none (every switch at its default)." in report
    assert all(json.loads(line)["settings"] == {} for line in capsys.readouterr().out.strip().splitlines())
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "400")
    monkeypatch.setenv("MLXCLIP_GPU_NORM_KERNEL", "1")
    monkeypatch.setenv("MLXCLIPX_OTHER", "1")  # not one of ours: another prefix
    cli.main(args, standalone_mode=False)
    report = (tmp_path / "bench-cpu-tiny-float32-b2.md").read_text()
    assert "Settings (environment): `MLXCLIP_GPU_NORM_KERNEL=1`, `MLX_MAX_OPS_PER_BUFFER=400`." in report
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert rows and all(r["settings"] == {"MLXCLIP_GPU_NORM_KERNEL": "1", "MLX_MAX_OPS_PER_BUFFER": "400"}
                        for r in rows)


def test_random_batch_caption_lengths():
    from benchmarks.batches import random_batch

    ids = random_batch(get_config("tiny"), 64, seed=1, words=(4, 6))["input_ids"]
    lengths = (ids != 0).sum(axis=1) - 2  # less SOT and EOT
    assert lengths.min() >= 4 and lengths.max() <= 6 and len(set(lengths.tolist())) == 3
    assert (ids[np.arange(64), lengths + 1] == 49407).all()


def test_bench_runs_mlx_under_the_chosen_malloc(tmp_path, capsys, monkeypatch):
    """MLXCLIP_MALLOC reaches MLX's worker process (its row says which allocator it ran under), not torch's; the
    report's header names MLX's malloc."""
    from mlx_clip import host_malloc

    found = [(name, host_malloc.find(name)) for name in host_malloc.LIBRARIES]
    name, library = next(((n, p) for n, p in found if p), (None, None))
    if library is None:
        pytest.skip("neither mimalloc nor jemalloc is installed (.ci/run installs libmimalloc2.0)")
    monkeypatch.setenv("MLXCLIP_MALLOC", library)
    cli.main(["bench", "--arch", "tiny", "--backend", "mlx,torch", "--task", "embed-text", "--mode", "eager",
              "--batch", "2", "--runs", "1", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path), "--json"],
             standalone_mode=False)
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {r["malloc"] for r in records if r["backend"] == "mlx"} == {name}
    assert all("malloc" not in r for r in records if r["backend"] == "torch")
    report = (tmp_path / "bench-cpu-tiny-float32-b2.md").read_text()
    assert f"MLX's malloc (`mlx_clip/host_malloc.py`): {os.path.basename(library)} (MLXCLIP_MALLOC)" in report
