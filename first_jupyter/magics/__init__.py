"""The ``%first`` / ``%%first`` magics (``%load_ext first_jupyter``); commands live in ``core``."""
