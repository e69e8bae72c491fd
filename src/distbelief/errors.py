"""The errors distbelief raises on purpose.

Every error a user can cause with bad input derives from `DistbeliefError`; the CLI prints
such an error as one line and exits non-zero. Anything else escaping is a bug and keeps its
traceback.
"""


class DistbeliefError(Exception):
    """Base of every error that is the user's input rather than a bug in distbelief."""


class ConfigError(DistbeliefError, ValueError):
    """A name or value that cannot be used: unknown model, invalid option, impossible number.

    The message names the offending value and, where there is a fixed set, the valid choices.
    """


def check_choice(what: str, value, choices) -> None:
    """Raise `ConfigError` unless `value` is one of `choices`, listing them in the message."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"invalid {what} {value!r}; choose one of: {listed}")


class DataError(DistbeliefError):
    """A dataset folder or file that is missing, malformed or unreachable; names the path."""


class CheckpointError(DistbeliefError):
    """A checkpoint that is missing, corrupt, truncated or written for another model."""


class StorageError(DistbeliefError):
    """A file or folder that cannot be written or read (read-only or full disk, a path through
    a regular file, no permission, a folder in use by another run); names the path and the
    operating system's reason."""


def storage_error(action: str, path, error: OSError) -> StorageError:
    """`error` (from writing or reading `path`) as one line: "cannot ACTION PATH: REASON"."""
    reason = error.strerror or str(error) or type(error).__name__
    return StorageError(f"cannot {action} {path}: {reason}")
