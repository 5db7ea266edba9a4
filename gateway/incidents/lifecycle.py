"""Incident states and the actions that move them (the seeds' closed loop: triage, dispatch,
arrival, handling, resolution, and the revisit before closing)."""

from __future__ import annotations

from dataclasses import dataclass

STATES = ("new", "acknowledged", "dispatched", "on_site", "resolved", "closed")
OPEN_STATES = frozenset(STATES) - {"closed"}


@dataclass(frozen=True)
class Action:
    name: str
    allowed_from: frozenset[str]
    to: str | None  # None: the state does not change
    needs_note: bool = False  # the note is the substance: a result, a revisit, a reason
    help: str = ""


ACTIONS: dict[str, Action] = {a.name: a for a in (
    Action("ack", frozenset({"new"}), "acknowledged", help="seen by the command centre"),
    Action("dispatch", frozenset({"new", "acknowledged"}), "dispatched",
           help="pushed to a team (and optionally one member)"),
    Action("reassign", frozenset({"dispatched", "on_site"}), None, help="another team or member"),
    Action("arrive", frozenset({"dispatched"}), "on_site", help="the team is on site"),
    Action("resolve", frozenset({"new", "acknowledged", "dispatched", "on_site"}), "resolved", needs_note=True,
           help="handled, with the result"),
    Action("close", frozenset({"resolved"}), "closed", help="closed after the revisit (结案回访)"),
    Action("reopen", frozenset({"resolved", "closed"}), "new", needs_note=True, help="back to triage, with why"),
    Action("comment", frozenset(STATES), None, needs_note=True, help="a note on the record"),
)}


class TransitionError(ValueError):
    """An action that the incident's state does not allow; says what would be allowed."""


def check(action: str, state: str, note: str | None) -> Action:
    spec = ACTIONS.get(action)
    if spec is None:
        raise TransitionError(f"unknown action {action!r}; actions: {', '.join(ACTIONS)}")
    if state not in spec.allowed_from:
        allowed = [a.name for a in ACTIONS.values() if state in a.allowed_from]
        raise TransitionError(f"cannot {action} an incident that is {state}; from {state} you can: "
                              f"{', '.join(allowed)}")
    if spec.needs_note and not (note or "").strip():
        raise TransitionError(f"{action} needs a note ({spec.help})")
    return spec
