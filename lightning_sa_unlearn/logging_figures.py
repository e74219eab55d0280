"""The report's figures and table sent to the Trainer's loggers, besides its scalars (rank 0 only).

A logger is recognised by the names of its classes, so that nothing here imports ``wandb`` or ``mlflow``:
TensorBoard, Weights & Biases and MLflow loggers get the figures of :meth:`UnlearningReport.figures` and
the table of :meth:`UnlearningReport.format_table`; other loggers (CSV, custom) get nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_sa_unlearn.report import UnlearningReport

PREFIX = "unlearn"


def _tensorboard(logger: Any, figures: dict[str, Figure], text: str, step: int) -> None:
    writer = logger.experiment  # a SummaryWriter (torch.utils.tensorboard or tensorboardX)
    for name, fig in figures.items():
        writer.add_figure(f"{PREFIX}/{name}", fig, global_step=step)
    writer.add_text(f"{PREFIX}/report", f"```\n{text}\n```", step)  # markdown: keep the columns


def _wandb(logger: Any, figures: dict[str, Figure], text: str, step: int) -> None:
    for name, fig in figures.items():
        logger.log_image(key=f"{PREFIX}/{name}", images=[fig], step=step)
    logger.log_text(key=f"{PREFIX}/report", columns=["report"], data=[[text]], step=step)


def _mlflow(logger: Any, figures: dict[str, Figure], text: str, step: int) -> None:
    client, run_id = logger.experiment, logger.run_id
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"{PREFIX}/{name}_step{step}.png")
    client.log_text(run_id, text, f"{PREFIX}/report_step{step}.txt")


_SENDERS: dict[str, Callable[[Any, dict[str, Figure], str, int], None]] = {
    "TensorBoardLogger": _tensorboard,
    "WandbLogger": _wandb,
    "MLFlowLogger": _mlflow,
}


def sender(logger: Any) -> Callable[[Any, dict[str, Figure], str, int], None] | None:
    """The function that sends figures and text to ``logger``'s kind (subclasses too); None if it has none."""
    for cls in type(logger).__mro__:
        if cls.__name__ in _SENDERS:
            return _SENDERS[cls.__name__]
    return None


def log_report_figures(loggers: list[Any], report: UnlearningReport, step: int) -> list[str]:
    """Send the figures and the table to each logger that takes them; returns the names of the kinds served.

    The figures are drawn once, and only when some logger takes them."""
    served = [(logger, send) for logger in loggers if (send := sender(logger)) is not None]
    if not served:
        return []
    figures, text = report.figures(), report.format_table()
    for logger, send in served:
        send(logger, figures, text, step)
    return [type(logger).__name__ for logger, _ in served]
