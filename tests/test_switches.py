"""mlx_clip.switches: the MLXCLIP_* settings read from the environment (on/off switches, integer choices)."""

import pytest

from mlx_clip.switches import env_choice, env_switch


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
