"""Every event kind the agent emits on `edgerun/v1/{device}/events`, as one enum.

The device's `EventBus.emit` takes an `EventKind` (mypy strict refuses a bare string,
so a misspelt kind cannot be emitted), and the console reads `EventMessage.kind`
against it (`EventKind.parse`: None for a kind a newer agent added). Whether a kind
re-publishes the retained `state` is a property of the kind (`republishes_state`),
not a rule on string prefixes that a new bare kind could slip past.

The `update.<phase>` kinds mirror `agent.protocol.update.Phase` one to one (a test
checks it); `Phase.event` returns the member.
"""

from __future__ import annotations

from enum import StrEnum


class EventKind(StrEnum):
    # The served model (agent/admission.py, agent/update/jobs.py, agent/link/tunables.py).
    MODEL_LOADED = "model.loaded"
    MODEL_REFUSED = "model.refused"
    MODEL_SWAPPED = "model.swapped"
    MODEL_ROLLED_BACK = "model.rolled_back"
    MODEL_RELOADED = "model.reloaded"  # reopened with new runtime threads
    # What a runtime did on its own while opening a model (agent/accelerator.py).
    RUNTIME_PROVIDER_FALLBACK = "runtime.provider_fallback"  # a provider failed; the next serves
    RUNTIME_ENGINE_BUILT = "runtime.engine_built"  # TensorRT built (and cached) engines
    # Which of a bundle's variants serves, with every variant's figures (agent/variants/).
    VARIANT_SELECTED = "variant.selected"
    # Memory watchdog (agent/service.py).
    OVERLOADED = "overloaded"
    OVERLOAD_CLEARED = "overload.cleared"
    # The link (agent/link/).
    COMMAND_REFUSED = "command.refused"
    OUTBOX_DROPPED = "outbox.dropped"
    OUTBOX_RECOVERED = "outbox.recovered"
    LINK_SUBSCRIPTION_REFUSED = "link.subscription_refused"
    TWIN_DESIRED = "twin.desired"
    # Update jobs: one kind per Phase (agent/protocol/update.py), then pull updates.
    UPDATE_ACCEPTED = "update.accepted"
    UPDATE_DOWNLOADING = "update.downloading"
    UPDATE_VERIFYING = "update.verifying"
    UPDATE_VALIDATING = "update.validating"
    UPDATE_SHADOW = "update.shadow"
    UPDATE_SWAPPING = "update.swapping"
    UPDATE_TRIAL = "update.trial"
    UPDATE_COMMITTED = "update.committed"
    UPDATE_FAILED = "update.failed"
    UPDATE_ROLLED_BACK = "update.rolled_back"
    UPDATE_CANCELLED = "update.cancelled"
    UPDATE_PULL = "update.pull"  # a release from the release index started a deploy
    UPDATE_PULL_REFUSED = "update.pull_refused"

    @property
    def republishes_state(self) -> bool:
        """True when the retained `state` may differ after this event (model, health,
        update job, twin desires), so the link recomputes it (sent only if changed)."""
        return self not in _STATE_UNCHANGED

    @classmethod
    def parse(cls, value: object) -> EventKind | None:
        """The member for a received kind; None for one this code does not know."""
        try:
            return cls(str(value)) if isinstance(value, str) else None
        except ValueError:
            return None


# Kinds that say something about messages or the link, never about what `state` shows.
_STATE_UNCHANGED = frozenset(
    {
        EventKind.COMMAND_REFUSED,
        EventKind.OUTBOX_DROPPED,
        EventKind.OUTBOX_RECOVERED,
        EventKind.LINK_SUBSCRIPTION_REFUSED,
    }
)

__all__ = ["EventKind"]
