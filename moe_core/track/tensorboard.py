"""TensorBoard: event files in runs/NAME/tensorboard/, so `tensorboard --logdir runs` shows every run."""

from __future__ import annotations

from typing import Any

from moe_core.track.base import Tracker


class TensorBoard(Tracker):
    name = package = "tensorboard"
    rewinds = True  # a resumed run purges the steps after its checkpoint: TensorBoard's own mechanism

    def open(self, params: dict[str, Any], start_step: int, continuing: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        logdir = self.run.path / "tensorboard"
        # purge_step: readers drop what earlier files hold from this step on (the steps a resume retrains).
        self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1 if continuing else None, flush_secs=10)
        self.entry["logdir"] = str(logdir.resolve())
        if not continuing:  # the HPARAMS tab: the config, against the validation loss
            for summary in hparams(
                {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}, {"eval/val_loss": 0.0}
            ):
                self.writer.file_writer.add_summary(summary)
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, step: int, key: str, text: str) -> None:
        self.writer.add_text(key, "    " + text.replace("\n", "\n    "), step)  # indented: shown verbatim

    def close(self, outcome: str) -> None:
        self.writer.close()

    @classmethod
    def describe(cls, run, entry: dict[str, Any]) -> str:
        logdir = entry.get("logdir", str(run.path / "tensorboard"))
        return f"event files in {logdir}; open with `tensorboard --logdir {run.path.parent}`"


TRACKER = TensorBoard
