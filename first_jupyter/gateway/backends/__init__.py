"""Backends: every kind of upstream speaks the same small async contract (``base.Backend``)."""
