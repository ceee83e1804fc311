"""The core's named errors. Each part maps them to its own edge (gRPC codes, CLI exit codes)."""


class FeedloopError(Exception):
    """Base class of every error feedloop raises on purpose."""


class ConfigError(FeedloopError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


class CorpusError(FeedloopError):
    """A corpus file cannot be used; the message names the file and line."""


class CheckpointError(FeedloopError):
    """A checkpoint failed verification; the message says what is wrong and where."""


class RegistryError(FeedloopError):
    """A registry operation cannot be done (unknown version, nothing to roll back to, ...)."""


class UnknownVersionError(RegistryError):
    """The registry has no version of that name."""


class PrunedVersionError(RegistryError):
    """The version was published but retention has since deleted its weights: it can no longer
    be served, tried or pinned (its manifest and decisions stay in the registry)."""


class LiveChanged(RegistryError):
    """A compare-and-set found another version than the caller expected (live, or on trial): the
    pointer moved since the caller read it, and nothing was changed."""


class TrialError(RegistryError):
    """A trial cannot start or end in the registry's current state: one is already running, none
    is, there is no live version to compare it with, or the version is the live one."""


class InvalidRecordError(FeedloopError):
    """A record breaks an invariant of the replay store (a non-finite log-probability): the
    whole write is refused and nothing of it is stored."""


class StoreError(FeedloopError):
    """The replay store failed in a way the caller cannot fix (disk, connection)."""


class StoreUnavailableError(StoreError):
    """The replay store cannot be reached or written now; retrying later may succeed."""


class StoreFullError(StoreUnavailableError):
    """The replay store's disk is full: writes are refused until space returns."""
