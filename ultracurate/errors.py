"""The one exception type a user sees: its message is a single clear line."""


class UltracurateError(Exception):
    """An error caused by input or state the user can fix. The CLI prints `error: <message>`
    and exits non-zero; the catalog is left as it was."""


class SelectionError(UltracurateError):
    """A --where predicate that is not a single read-only expression over the catalog."""


class CatalogBusyError(UltracurateError):
    """Another process holds the catalog for writing."""
