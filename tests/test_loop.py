"""The training loop's pipelining (mlx_clip.train.loop.train): step s + 1 is queued before step s is read, except where
a hook needs step s's state (evaluation, checkpoint, the loss inputs' hooks), which then sees exactly that state."""

import mlx.core as mx
import numpy as np

from mlx_clip.train import loop

BATCH = {"images": np.zeros((2, 4, 4, 3), np.float32), "input_ids": np.zeros((2, 4), np.int32),
         "labels": np.array([0, 1]), "texts": ["a", "b"]}


def _counter_run(steps, events, **kwargs):
    """A step whose state is a counter (w = number of steps applied); every call and hook appends to `events`."""
    state = {"w": mx.array(0.0)}
    drawn = [0]

    def batches():
        while True:
            drawn[0] += 1
            yield BATCH

    def step_fn(images, ids, labels):
        events.append(("launch",))
        state["w"] = state["w"] + 1.0
        return state["w"] * 0.5, mx.array(1.0), mx.array(True)

    hooks = loop.LoopHooks(
        log=lambda record: events.append(("log", record["step"])) if "loss" in record else None,
        evaluate=lambda step: events.append(("eval", step, state["w"].item())) or {"acc": 1.0},
        checkpoint=lambda step, extra: events.append(("save", step, state["w"].item(), drawn[0])))
    last = loop.train(step_fn, batches(), 0, steps, hooks, state_fn=lambda: [state["w"]], **kwargs)
    return last, state, drawn[0]


def test_the_next_step_is_queued_before_this_one_is_read():
    events = []
    last, state, drawn = _counter_run(4, events, log_every=1)
    assert [e[0] + (str(e[1]) if e[0] == "log" else "") for e in events] == [
        "launch", "launch", "log1", "launch", "log2", "launch", "log3", "log4"]
    assert last["step"] == 4 and last["loss"] == 2.0 and state["w"].item() == 4.0 and drawn == 4


def test_hooks_that_need_the_state_see_their_own_step():
    events = []
    _counter_run(7, events, log_every=1, eval_every=3, save_every=2)
    evals = [e for e in events if e[0] == "eval"]
    saves = [e for e in events if e[0] == "save"]
    assert evals == [("eval", 3, 3.0), ("eval", 6, 6.0)]  # the model as that step left it, not the next one's
    assert saves == [("save", 2, 2.0, 2), ("save", 4, 4.0, 4), ("save", 6, 6.0, 6)]  # and the data position
    order = [e[0] + (str(e[1]) if e[0] != "launch" else "") for e in events]
    # a step that is evaluated or saved is finished before the next one is launched
    for step in (2, 3, 4, 6):
        first_hook = min(i for i, e in enumerate(order) if e in (f"eval{step}", f"save{step}"))
        assert order[:first_hook].count("launch") == step


def test_a_failing_data_source_still_logs_the_step_that_ran():
    events = []

    def batches():
        yield BATCH
        yield BATCH
        raise RuntimeError("bad shard")

    state = {"w": mx.array(0.0)}

    def step_fn(images, ids, labels):
        state["w"] = state["w"] + 1.0
        return state["w"], mx.array(1.0), mx.array(True)

    hooks = loop.LoopHooks(log=lambda record: events.append(record["step"]))
    try:
        loop.train(step_fn, batches(), 0, 5, hooks, log_every=1, state_fn=lambda: [state["w"]])
    except RuntimeError as err:
        assert "bad shard" in str(err)
    else:
        raise AssertionError("the data source's error was swallowed")
    assert events == [1, 2]
