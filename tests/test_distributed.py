"""Data-parallel fine-tuning under `mlx.launch` (2 ranks on localhost, ring backend, CPU) against one process with the
same global batch and seed: the same losses at every step, the same final weights, rank 0 alone writing, resume at the
same world size, and the gather/average helpers against numpy. The reference for the 2-rank run is the ordinary
1-process engine, which runs none of the distributed code."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest

import mlx_clip.train.finetune as ft
from converters.convert import init_model
from mlx_clip.data.synth import synthesize
from mlx_clip.train.args import TrainingArgs

LAUNCH = Path(sys.executable).parent / "mlx.launch"
STEPS, BATCH = 20, 16
# clip + a label-aware term: the loss needs the gathered features *and* the gathered labels.
LOSS = "clip:1,multi_positive:0.5"

pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], n: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`mlx.launch -n n --backend ring -- python ARGS` on localhost. One BLAS thread per rank: the ranks share the
    machine's cores. mlx.launch exits 0 even when a rank fails, so callers check outputs, not the return code."""
    cmd = [str(LAUNCH), "-n", str(n), "--backend", "ring", "--starting-port", str(_free_port()),
           "--env", "MKL_NUM_THREADS=1", "--env", "OMP_NUM_THREADS=1", "--", sys.executable, *args]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def _flags(args: TrainingArgs) -> list[str]:
    """The CLI flags that reproduce `args` (every field, so the subprocess needs no defaults to agree)."""
    out = []
    for key, value in args.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif value != "":
            out += [flag, str(value)]
    return out


def finetune_launched(args: TrainingArgs, n: int = 2) -> subprocess.CompletedProcess:
    result = launch(["-m", "mlx_clip", "finetune", *_flags(args)], n)
    assert (Path(args.out) / "final" / "model.safetensors").exists(), result.stdout + result.stderr
    return result


def _records(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _train_records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in _records(run_dir) if "loss" in r}


def _weights(run_dir) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(Path(run_dir) / "final" / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    synthesize("industrial", root / "data", n=200, seed=0, image_size=32)  # 160 train: 10 global batches per epoch
    model = init_model("tiny", 0, root / "tiny")
    # Augmentation stays on (random resized crops): it is keyed by the sample, so both setups crop alike.
    base = TrainingArgs(model=str(model), train_data=str(root / "data" / "train.csv"), steps=STEPS,
                        batch_size=BATCH, lr=1e-3, loss=LOSS, log_every=1, workers=1, prefetch=1, seed=0,
                        save_every=10, keep_last=3)
    one = TrainingArgs(**{**base.to_dict(), "out": str(root / "one")})
    ft.finetune(one, quiet=True)
    two = TrainingArgs(**{**base.to_dict(), "out": str(root / "two")})
    finetune_launched(two)
    return root, one, two


def test_two_ranks_match_one_process_at_every_step(setup):
    _, one, two = setup
    a, b = _train_records(one.out), _train_records(two.out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-5 * abs(a[step][key]), (step, key, a[step], b[step])
    assert a[STEPS]["loss"] < a[1]["loss"]  # it trained, so equal weights are not equal initial weights


def test_two_ranks_final_weights_match_one_process(setup):
    _, one, two = setup
    wa, wb = _weights(one.out), _weights(two.out)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], rtol=0, atol=1e-5, err_msg=key)
    start = {k: np.array(v) for k, v in mx.load(str(Path(one.model) / "model.safetensors")).items()}
    assert max(np.abs(wa[k] - start[k]).max() for k in wa) > 1e-3  # the weights moved: the match is not trivial


def test_rank_zero_alone_writes_and_records_every_rank_position(setup):
    _, _, two = setup
    records = _records(two.out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one writer: no doubled or interleaved lines
    state = json.loads((Path(two.out) / "checkpoints" / "step-00000010" / "state.json").read_text())
    assert [s["rank"] for s in state["data_ranks"]] == [0, 1]
    assert all(s["world_size"] == 2 and s["position"] == 80 for s in state["data_ranks"])  # 10 steps x 8 per rank
    assert state["data"] == state["data_ranks"][0]
    assert (Path(two.out) / "summary.md").exists() and (Path(two.out) / "config.yaml").exists()


def test_resume_at_the_same_world_size_equals_the_uninterrupted_run(setup):
    root, _, two = setup
    resumed = TrainingArgs(**{**two.to_dict(), "out": str(root / "resumed"), "resume": "latest"})
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(Path(two.out) / "checkpoints" / "step-00000010", root / "resumed" / "checkpoints" / "step-00000010")
    finetune_launched(resumed)
    a, b = _train_records(two.out), _train_records(resumed.out)
    assert sorted(b) == list(range(11, STEPS + 1))
    for step in b:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=0), step
    wa, wb = _weights(two.out), _weights(resumed.out)
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], rtol=0, atol=1e-6, err_msg=key)


def test_resume_at_another_world_size_is_refused(setup, tmp_path):
    _, _, two = setup
    args = TrainingArgs(**{**two.to_dict(), "out": str(tmp_path / "one"),
                           "resume": str(Path(two.out) / "checkpoints" / "step-00000010")})
    with pytest.raises(ValueError, match="world_size=2"):
        ft.finetune(args, quiet=True)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_a_clear_error(setup):
    root, _, two = setup
    bad = TrainingArgs(**{**two.to_dict(), "out": str(root / "bad"), "batch_size": 15})
    result = launch(["-m", "mlx_clip", "finetune", *_flags(bad)])
    assert "--batch-size 15 is the global batch and must divide evenly over 2 processes" in result.stdout + result.stderr
    assert not (root / "bad").exists()


def test_gather_with_grad_labels_and_averaging_against_numpy():
    result = launch([str(Path(__file__).parent / "_distributed_worker.py")], timeout=120)
    rows = sorted((json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], result.stdout + result.stderr
    n = 2
    x = np.concatenate([np.array(r["x"]) for r in rows])  # (6, 4) rank-major, as all_gather stacks them
    w = np.arange(n * 3 * 4, dtype=np.float64).reshape(n * 3, 4) / 10
    for r in rows:
        assert r["loss"] == pytest.approx(np.sum(w * x**2), rel=1e-5)  # every rank: the loss of the global batch
        # d/dx_r of the sum over ranks of their (identical) losses: n * 2 w x on this rank's rows
        mine = slice(3 * r["rank"], 3 * r["rank"] + 3)
        np.testing.assert_allclose(r["grad"], n * 2 * w[mine] * x[mine], rtol=1e-5)
        # per-rank "unlabelled" ids (-1, -3) renumbered by global position, as one process numbers them
        assert r["labels"] == [-1, 7, -3, -4, 7, -6]
        assert r["avg_empty"] == {} and r["avg_w"] == [1.5, 1.5] and r["avg_b"] == 0.5
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]


@pytest.mark.slow
def test_mlx_two_ranks_match_open_clip_ddp_under_torchrun(setup):
    """The same 2-rank run in torch: open_clip under torchrun (DDP over gloo), gather_with_grad, same shards.
    At lr 1e-4 the two frameworks agree step by step (at 1e-3 Adam's sign-like first steps amplify rounding noise
    in near-zero gradient components, a framework difference and not a distributed one)."""
    root, _, two = setup
    mlx_run = TrainingArgs(**{**two.to_dict(), "out": str(root / "two-lr1e-4"), "lr": 1e-4, "save_every": 0})
    finetune_launched(mlx_run)
    out = root / "torch_ddp.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "torch_ref.ddp", "--model", two.model, "--train-data", two.train_data, "--steps", str(STEPS),
           "--batch-size", str(BATCH), "--lr", "1e-4", "--loss", LOSS, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    torch_steps = {r["step"]: r for r in map(json.loads, out.read_text().splitlines())}
    mlx_steps = _train_records(mlx_run.out)
    assert sorted(torch_steps) == sorted(mlx_steps) == list(range(1, STEPS + 1))
    for step, t in torch_steps.items():
        assert mlx_steps[step]["loss"] == pytest.approx(t["loss"], rel=1e-5), step
        assert mlx_steps[step]["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-4), step
