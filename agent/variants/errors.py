"""Refusals of the variant choice; BundleErrors, so every caller's REFUSALS catch them."""

from __future__ import annotations

from agent.bundle_errors import BundleError


class VariantMissingError(BundleError):
    """`model.variant` pins an id the bundle does not carry."""

    code = "bundle.variant_missing"


class NoVariantPassedError(BundleError):
    """Every variant a runtime here can load failed its validation on this device."""

    code = "bundle.no_variant_passed"

    def __init__(self, message: str, failures: dict[str, str]) -> None:
        super().__init__(message)
        self.failures = failures  # variant id -> why it failed


__all__ = ["NoVariantPassedError", "VariantMissingError"]
