"""benchmarks/determinism.py: the training step twice from the same weights; on the CPU every array must come out
bit-equal (what tests/test_finetune.py's skipped-step test relies on), and the tool must say so."""

import re

from benchmarks import determinism


def test_two_identical_cpu_runs_are_bit_equal(capsys):
    determinism.main(["--steps", "2", "--batch", "2"])
    out = capsys.readouterr().out
    found = re.search(r"(\d+) of (\d+) arrays differ", out)
    assert found and int(found[1]) == 0 and int(found[2]) > 100, out
