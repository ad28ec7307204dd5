"""Exceptions a user can act on: each names the file, line, field or parameter that is wrong."""


class DeftxError(Exception):
    """Base class: the message is meant for the user, not a traceback."""


class DataError(DeftxError, ValueError):
    """A corpus or task file cannot be used (missing, empty, wrong encoding, wrong columns, bad labels)."""


class VectorError(DeftxError, ValueError):
    """A sparse vector folder is missing, corrupted, or does not fit the model it is applied to."""


class ConfigError(DeftxError, ValueError):
    """A setting is out of range or contradicts another (e.g. k larger than the maskable parameters)."""
