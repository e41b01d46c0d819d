"""Experiment trackers (`--report-to none|tensorboard|wandb`, a comma list for several): views of a run folder.

The run folder stays the one truth (train_log.jsonl, samples/, train_stats.json, sweep.json); a tracker receives
the same records as they are written, through accelerate's tracker classes (`accelerate.tracking`), and keeps its
own files under the run folder: `RUN/tracking/tensorboard/` (event files; `tensorboard --logdir RUN/tracking`) and
`RUN/tracking/wandb/` (W&B's run folder; offline runs are uploaded later with `wandb sync`). A sweep logs its
table of cells under `SWEEP_DIR/tracking/` the same way.

Default `none`: diffusers' training scripts default `--report_to` to tensorboard, but here a tracker is an optional
extra (`pip install -e ".[tracking]"`) that the run folder does not need, so nothing is written unless asked for.

Only rank 0 logs (the values it logs are already reduced over the ranks). W&B honours `WANDB_MODE` (offline,
disabled); in online mode an unreachable W&B host (no network, a firewall) switches the run to offline mode after a
short connection probe instead of letting `wandb.init` wait, so a training never hangs on its tracker.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from harness.errors import UserError

TRACKERS = ("tensorboard", "wandb")
TRACKING_DIR = "tracking"  # under the run (or sweep) folder
EXTRA_HINT = 'pip install -e ".[tracking]"'
WANDB_PROJECT = "medvqa-harness"  # W&B project unless WANDB_PROJECT says otherwise
PROBE_TIMEOUT_S = 3.0

# train_log.jsonl keys -> tracker tags; any other numeric key of a training record is a loss term (train/<name>).
_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "samples_per_s": "train/samples_per_s", "epoch": "train/epoch", "skipped_steps": "train/skipped_steps",
         "val_loss": "val/loss"}
_NOT_LOGGED = ("step", "micro_batches")


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`none` -> (); `tensorboard,wandb` -> ("tensorboard", "wandb"). Unknown names (or `none` beside a tracker) are
    a one-line error naming the allowed ones."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [s.strip().lower() for s in items if s.strip()]
    if not names or names == ["none"]:
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad or "none" in names:
        what = "none goes alone" if not bad else f"unknown tracker(s) {', '.join(bad)}"
        raise UserError(f"--report-to: {what}; give none, {', '.join(TRACKERS)} or a comma list of trackers")
    return tuple(dict.fromkeys(names))


def normalize_report_to(value: str) -> str:
    """The canonical spelling recorded in a run's config: "none" or the trackers joined by commas."""
    return ",".join(parse_report_to(value)) or "none"


def check_available(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The trackers of `value`, after checking that their packages import: a missing one is a one-line UserError
    naming the extra to install, raised before any training starts."""
    names = parse_report_to(value)
    for name in names:
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package itself)
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise UserError(f"--report-to {name}: the {name} package is not installed; install the tracking extra: "
                            f"{EXTRA_HINT}") from None
    return names


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"loop.lr": 1e-4, ...} with values TensorBoard's hparams and W&B's config accept."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(d, (bool, int, float, str)):
        out[key] = d
    else:
        out[key] = "none" if d is None else str(d)
    return out


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme != "http" else 80)


def wandb_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the W&B host opens within `timeout` seconds (no request is sent)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy a direct connection proves nothing: the library's own timeouts apply
    try:
        with socket.create_connection(_wandb_host(), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> str:
    """online / offline / disabled: WANDB_MODE as W&B reads it (dryrun = offline), else online when the W&B host
    answers, else offline (said once on the console)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun"):
        return "offline"
    if mode == "disabled":
        return "disabled"
    if not wandb_reachable():
        from harness.progress import console

        host, port = _wandb_host()
        console.print(f"[yellow]wandb:[/] {host}:{port} is unreachable: logging offline (upload later with "
                      "`wandb sync`)")
        return "offline"
    return "online"


def _wandb_id(name: str, key: str) -> str:
    """A stable W&B run id for a run (or sweep) folder, so a resumed training continues the same W&B run."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:80].strip("-") or "run"
    return f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class Trackers:
    """The trackers of one run (or sweep) folder, on rank 0; with no tracker every method does nothing.

    `start` creates them under `folder/tracking/` (TensorBoard: purging the steps after `resume_step` that a killed
    attempt logged, as train_log.jsonl is truncated on resume or dropped on a retrain; W&B: the same run id again), `log_record` logs a
    train_log.jsonl record, `log_image` a PNG the run wrote, `log_table` a table, `finish` closes them."""

    def __init__(self, names: tuple[str, ...] = ()):
        self.names = names
        self._trackers: list[Any] = []

    def __bool__(self) -> bool:
        return bool(self._trackers)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    @classmethod
    def start(cls, report_to: str | None, folder: Path, name: str, config: dict[str, Any] | None = None,
              group: str | None = None, resume_step: int = 0, key: str | None = None) -> "Trackers":
        names = check_available(report_to)
        self = cls(names)
        if not names:
            return self
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        from harness.distributed import state

        state()  # accelerate's trackers ask PartialState() who is the main process: make it the harness's state
        root = Path(folder) / TRACKING_DIR
        root.mkdir(parents=True, exist_ok=True)
        flat = _flat(config or {})
        try:
            for n in names:
                if n == "tensorboard":
                    # an earlier attempt's steps after `resume_step` (a resume, or a retrain from step 0 in the
                    # same run) are hidden, as its train_log.jsonl lines are dropped
                    tracker = TensorBoardTracker("tensorboard", root, purge_step=resume_step + 1)
                else:
                    mode = wandb_mode()
                    if mode == "disabled":
                        continue
                    tracker = WandBTracker(
                        os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=name, group=group, dir=str(root),
                        id=_wandb_id(name, key or str(Path(folder).resolve())), resume="allow", mode=mode,
                        config=flat)
                tracker.start()
                self._trackers.append(tracker)
                if n == "tensorboard" and flat and resume_step == 0:
                    tracker.store_init_configuration(flat)
        except ImportError as e:  # a broken install of the package (e.g. tensorboard without its protobuf)
            self.finish()
            raise UserError(f"--report-to: cannot start the tracker ({e}); reinstall the tracking extra: "
                            f"{EXTRA_HINT}") from None
        except Exception as e:
            self.finish()
            if type(e).__module__.startswith("wandb"):  # e.g. online mode without an API key
                raise UserError(f"--report-to wandb: {e} (log in with `wandb login`, set WANDB_API_KEY, or set "
                                "WANDB_MODE=offline)") from None
            raise
        return self

    def log(self, values: dict[str, Any], step: int) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            for t in self._trackers:
                t.log(values, step=step)

    def log_record(self, record: dict[str, Any]) -> None:
        """One train_log.jsonl record: loss, lr, grad norm, throughput, epoch, the loss's terms, validation loss."""
        if not self._trackers:
            return
        values = {}
        for k, v in record.items():
            if k in _NOT_LOGGED or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            values[_TAGS.get(k) or (f"val/{k}" if k.startswith("best_") else f"train/{k}")] = v
        self.log(values, int(record["step"]))

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """A PNG the run wrote (a sample grid), as an image of each tracker."""
        if not self._trackers or not Path(path).is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        for t in self._trackers:
            if t.name == "tensorboard":
                t.log_images({tag: arr[None]}, step=step, dataformats="NHWC")
                t.writer.flush()
            else:
                t.log_images({tag: [arr]}, step=step)

    def log_table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table: a W&B Table, a markdown table in TensorBoard's text tab."""
        if not self._trackers:
            return
        for t in self._trackers:
            if t.name == "wandb":
                t.log_table(tag, columns=columns, data=rows, step=step)
            else:
                t.log({tag: markdown_table(columns, rows)}, step=step)

    def finish(self) -> None:
        for t in self._trackers:
            try:
                t.finish()
            except Exception:  # noqa: BLE001 - closing a view must never fail the run it views
                pass
        self._trackers = []


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
