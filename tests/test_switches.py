"""mlx_clip.switches: the MLXCLIP_* settings read from the environment (on/off switches, integer and named choices)."""

import pytest

from mlx_clip.switches import env_choice, env_switch, env_word


@pytest.mark.parametrize("value,want", [("1", True), ("ON", True), (" yes ", True), ("0", False), ("off", False),
                                        ("maybe", None), ("", None)])
def test_env_switch(monkeypatch, value, want):
    monkeypatch.setenv("MLXCLIP_TEST_SWITCH", value)
    for default in (True, False):
        assert env_switch("MLXCLIP_TEST_SWITCH", default) is (default if want is None else want)


def test_env_choice_takes_a_listed_value_and_names_any_other(monkeypatch):
    monkeypatch.delenv("MLXCLIP_TEST_CHOICE", raising=False)
    assert env_choice("MLXCLIP_TEST_CHOICE", (16, 32), 32) == 32
    monkeypatch.setenv("MLXCLIP_TEST_CHOICE", " 16 ")
    assert env_choice("MLXCLIP_TEST_CHOICE", (16, 32), 32) == 16
    for bad, expected in (("24", "16 or 32"), ("x", "16 or 32"), ("-16", "16 or 32")):
        monkeypatch.setenv("MLXCLIP_TEST_CHOICE", bad)
        with pytest.warns(UserWarning, match=f"MLXCLIP_TEST_CHOICE='{bad}': expected {expected}; using 32"):
            assert env_choice("MLXCLIP_TEST_CHOICE", (16, 32), 32) == 32
    monkeypatch.setenv("MLXCLIP_TEST_CHOICE", "3")
    with pytest.warns(UserWarning, match="expected 0, 1 or 2; using 1"):
        assert env_choice("MLXCLIP_TEST_CHOICE", (0, 1, 2), 1) == 1


def test_env_word_takes_a_listed_name_in_any_case_and_names_any_other(monkeypatch):
    ways = ("auto", "flat", "kernel")
    monkeypatch.delenv("MLXCLIP_TEST_WORD", raising=False)
    assert env_word("MLXCLIP_TEST_WORD", ways, "auto") == "auto"
    monkeypatch.setenv("MLXCLIP_TEST_WORD", " Flat ")
    assert env_word("MLXCLIP_TEST_WORD", ways, "auto") == "flat"
    monkeypatch.setenv("MLXCLIP_TEST_WORD", "flatten")
    with pytest.warns(UserWarning, match="MLXCLIP_TEST_WORD='flatten': expected auto, flat or kernel; using auto"):
        assert env_word("MLXCLIP_TEST_WORD", ways, "auto") == "auto"


def test_norm_squares_follows_its_environment_setting():
    """MLXCLIP_NORM_SQUARES picks the clip norm's way for a whole process (separate-process A/Bs on a card);
    MLXCLIP_GPU_NORM_KERNEL whether "auto" takes the strided kernel on CUDA (on by default since session 27);
    MLXCLIP_GPU_FOLD_CLIP folds the clip factor (on by default since session 22). Read at import, so each setting is
    read by a fresh process."""
    import os
    import subprocess
    import sys

    probe = ("from mlx_clip.train import optim, step; "
             "print(step.NORM_SQUARES, step.GPU_NORM_KERNEL, optim.FOLD_CLIP_GPU)")
    base = {k: v for k, v in os.environ.items() if k not in ("MLXCLIP_NORM_SQUARES", "MLXCLIP_GPU_NORM_KERNEL",
                                                             "MLXCLIP_GPU_FOLD_CLIP")}
    for env, want in (({}, "auto True True"),
                      ({"MLXCLIP_GPU_NORM_KERNEL": "0", "MLXCLIP_GPU_FOLD_CLIP": "0"}, "auto False False"),
                      ({"MLXCLIP_NORM_SQUARES": "flat", "MLXCLIP_GPU_NORM_KERNEL": "1", "MLXCLIP_GPU_FOLD_CLIP": "1"},
                       "flat True True")):
        out = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.split("\n")[-2] == want, (env, out.stdout)


@pytest.mark.parametrize("way,switch,strided", [("auto", True, True), ("auto", False, False), ("kernel", False, True),
                                                ("flat", True, False), ("reduce", True, False)])
def test_the_clip_norm_takes_the_strided_kernel_where_its_settings_say(monkeypatch, way, switch, strided):
    """Where CUDA's kernels apply (stood in for here: this machine has none), "auto" sums the clip norm's squares
    with the strided kernel unless MLXCLIP_GPU_NORM_KERNEL=0, "kernel" always, the per-gradient ways never; the norm
    is the same either way (the stand-in computes it with numpy)."""
    import mlx.core as mx
    import numpy as np

    from mlx_clip.train import multi_tensor, step

    calls = []

    def strided_stand_in(arrays):
        calls.append(len(arrays))
        return mx.array(sum(float(np.sum(np.square(np.array(a, dtype=np.float64)))) for a in arrays))

    monkeypatch.setattr(step, "NORM_SQUARES", way)
    monkeypatch.setattr(step, "GPU_NORM_KERNEL", switch)
    monkeypatch.setattr(multi_tensor, "applies", lambda arrays, switched_on=None: bool(switched_on))
    monkeypatch.setattr(multi_tensor, "sum_of_squares_strided", strided_stand_in)
    rng = np.random.default_rng(0)
    grads = {"w": mx.array(rng.standard_normal((6, 5)).astype(np.float32)),
             "b": mx.array(rng.standard_normal(5).astype(np.float32))}
    norm = float(step._global_norm(grads).item())
    assert calls == ([2] if strided else [])
    want = np.sqrt(sum(np.sum(np.square(np.array(g, dtype=np.float64))) for g in grads.values()))
    assert abs(norm - want) <= 1e-5 * want
