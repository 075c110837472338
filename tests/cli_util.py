"""Shared by the CLI-driven tests: run `mlxclip` in-process and make a seeded tiny model dir."""

from click.testing import CliRunner

from mlx_clip import cli


def invoke(*args, code: int = 0):
    """Run `mlxclip ARGS` in-process; fail the test with the command's output unless it exits with `code`."""
    result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def tiny_model(tmp_path_factory, seed: int):
    out = tmp_path_factory.mktemp("m") / "tiny"
    invoke("init", "--arch", "tiny", "--seed", seed, "--out", out)
    return out
