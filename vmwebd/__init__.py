"""vmweb: a peer-to-peer manager of virtual clusters (the ``vmwebd`` daemon and the ``vmweb`` CLI).

Importing the package imports nothing else: the command line must start fast and without the
server's libraries.
"""

#: The project's version; ``pyproject.toml`` reads it from here when the package is built.
__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version (its metadata), else :data:`__version__` when
    running from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vmweb")
    except PackageNotFoundError:
        return __version__
