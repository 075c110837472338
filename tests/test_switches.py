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
    """MLXCLIP_NORM_SQUARES picks the clip norm's way for a whole process (separate-process A/Bs on a card), ahead of
    MLXCLIP_GPU_NORM_KERNEL; MLXCLIP_GPU_FOLD_CLIP folds the clip factor (on by default since session 22). Read at
    import, so each setting is read by a fresh process."""
    import os
    import subprocess
    import sys

    probe = "from mlx_clip.train import optim, step; print(step.NORM_SQUARES, optim.FOLD_CLIP_GPU)"
    base = {k: v for k, v in os.environ.items() if k not in ("MLXCLIP_NORM_SQUARES", "MLXCLIP_GPU_NORM_KERNEL",
                                                             "MLXCLIP_GPU_FOLD_CLIP")}
    for env, want in (({}, "auto True"),
                      ({"MLXCLIP_GPU_NORM_KERNEL": "1", "MLXCLIP_GPU_FOLD_CLIP": "0"}, "kernel False"),
                      ({"MLXCLIP_NORM_SQUARES": "flat", "MLXCLIP_GPU_NORM_KERNEL": "1", "MLXCLIP_GPU_FOLD_CLIP": "1"},
                       "flat True")):
        out = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True,
                             check=True)
        assert out.stdout.split("\n")[-2] == want, (env, out.stdout)
