"""The primitives of an unevaluated MLX graph, for tests that count graph nodes (a host-bound GPU step pays per node)."""

import io
import re

import mlx.core as mx


def primitives(*arrays: mx.array) -> list[str]:
    """The primitive name of each node in the graph making `arrays` (mx.export_to_dot's labels; arrays are unlabelled
    nodes there), one entry per node."""
    out = io.StringIO()
    mx.export_to_dot(out, *arrays)
    return [label.split()[0] for label in re.findall(r'label ?= ?"([^"]*)"', out.getvalue()) if label]
