"""Serving many tasks: mixed-task batches and task-agnostic prediction (``ServingMixin``)."""

__all__ = ['ServingMixin']


class ServingMixin:
    """Multi-task inference methods of modcl models."""
