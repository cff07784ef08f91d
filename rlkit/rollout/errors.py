"""Errors of the generation layer a user can fix (light: no torch import)."""


class VLLMError(RuntimeError):
    """vLLM cannot run here (not installed, no usable platform); the message says what to do instead."""
