"""The ``%first`` / ``%%first`` magics (``%load_ext first_jupyter``): the extension's entry is ``extension.load``;
the commands live in ``core`` and ``batch``."""
