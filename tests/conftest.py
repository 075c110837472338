"""Fixtures shared across test modules, registered here once so that a session-scoped one is built once (imported
into two modules, pytest would build it per module): the fine-tuning tests' dataset, model and reference run
(tests/finetune_util.py). A module that defines a fixture of the same name (several define their own `tiny_dir`)
keeps its own."""

from finetune_util import data_dir, run_a, tiny_dir  # noqa: F401
