"""One-line notices that say what a run did where silence could be read as success."""

from __future__ import annotations

from typing import Any

from lightning_sa_unlearn.data import UnlearningData

LOADERS = ("train", "forget", "corrected", "retain", "val", "test", "triggered_test")


def kind_of_unlearning(data: UnlearningData, *owners: Any) -> tuple[str, bool]:
    """``(notice, is_warning)``: label correction or sample deletion, and the loaders the run read.

    Sample deletion is a warning when an owner has a method whose name looks like a misspelt
    ``corrected_dataloader`` (the run would otherwise switch to deletion without a word).
    """
    read = ", ".join(f"{name}_dataloader()" for name in LOADERS if getattr(data, name) is not None)
    if data.corrected is not None:
        return f"unlearning by label correction (D_f and its corrected labels D̃_f); loaders read: {read}.", False
    near = sorted(
        {
            name
            for owner in owners
            if owner is not None
            for name in dir(owner)
            if "correct" in name.lower() and name != "corrected_dataloader" and callable(getattr(owner, name, None))
        }
    )
    notice = (
        "unlearning by sample deletion (no corrected_dataloader() was found, so D_f's samples are forgotten "
        f"without corrected labels); loaders read: {read}."
    )
    if near:
        notice += f" {near} look like a corrected set: name the method corrected_dataloader() for label correction."
    return notice, bool(near)


def unchanged_model(tau: float | None, searched: bool, moved: bool, update: str) -> str | None:
    """The notice for an update that left the selected parameters as they were (None when it moved them)."""
    if moved:
        return None
    if tau == 0 and searched:
        return (
            "τ = 0 was chosen: no step size lowered the validation objective beyond noise, so the model is unchanged "
            "(every before/after row is the same). Try update='fine_tune', another selection, or more validation data."
        )
    if tau == 0:
        return "τ = 0 was fixed (step_size=0): the model is unchanged."
    return (
        f"the {update} update left the selected parameters as they were (see the report's update_details), so the "
        "model is unchanged."
    )


__all__ = ["kind_of_unlearning", "unchanged_model"]
