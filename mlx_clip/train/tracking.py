"""Where metrics go: RUN_DIR/metrics.jsonl always, the terminal, and optional TensorBoard / MLflow."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsLog:
    """Append-only JSON lines. On resume, lines past the resumed step are dropped so the file tells one history."""

    def __init__(self, path, resume_step: int | None = None, trackers: str = "", run_dir=None, quiet: bool = False):
        self.path = Path(path)
        self.quiet = quiet
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [ln for ln in _lines(self.path) if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.trackers = [_tracker(name.strip(), run_dir or self.path.parent) for name in trackers.split(",") if name.strip()]

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")
        for tracker in self.trackers:
            tracker(record)
        if not self.quiet:
            if sys.stderr.isatty():  # a progress bar owns the terminal: write above it
                from tqdm import tqdm

                tqdm.write(format_record(record), file=sys.stderr)
            else:
                print(format_record(record), flush=True)

    def records(self) -> list[dict]:
        return [json.loads(ln) for ln in _lines(self.path)]


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _plain(x):
    return float(x) if hasattr(x, "__float__") else str(x)


def format_record(record: dict) -> str:
    parts = [f"step {record.get('step', '?')}"]
    for key, value in record.items():
        if key == "step" or isinstance(value, (list, dict)):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _tracker(name: str, run_dir):
    if name == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("--report-to tensorboard needs `pip install tensorboardX` (or torch + tensorboard)") from exc
        writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

        def log_tb(record):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, record["step"])
            writer.flush()

        return log_tb
    if name == "mlflow":
        try:
            import mlflow
        except ImportError as exc:
            raise RuntimeError("--report-to mlflow needs `pip install mlflow`") from exc
        mlflow.set_tracking_uri(f"file:{Path(run_dir).resolve() / 'mlruns'}")
        mlflow.start_run()

        def log_mlflow(record):
            values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            mlflow.log_metrics(values, step=record["step"])

        return log_mlflow
    raise ValueError(f"--report-to: unknown tracker {name!r} (known: tensorboard, mlflow)")
