"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class AtomDistillError(Exception):
    """A problem the user can fix (bad input, missing files, unknown names)."""


class DatasetError(AtomDistillError):
    """A dataset is missing, corrupt or of the wrong shape."""


class ConfigError(AtomDistillError):
    """An option or combination of options is invalid."""
