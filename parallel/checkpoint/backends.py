"""Which storage a checkpoint location uses: one line per backend (the interface: storage.py)."""

from __future__ import annotations

from parallel.checkpoint.storage import LocalStorage, Location, Storage, is_url

__all__ = ["location_problem", "storage_for"]

_LOCAL = LocalStorage()


def storage_for(location: Location) -> Storage:
    """The storage of `location`: fsspec for a URL, the local file system for a path."""
    if is_url(location):
        from parallel.checkpoint.fsspec_storage import fsspec_storage  # fsspec: only when used

        return fsspec_storage(str(location))
    return _LOCAL


def location_problem(location: Location) -> str | None:
    """Why `location` cannot be a checkpoint folder here (fsspec or its protocol's package
    missing), or None; a plain path is never refused here (the preflight probes it)."""
    if not is_url(location):
        return None
    protocol = str(location).split("://", 1)[0]
    try:
        import fsspec
    except ImportError:
        return "a URL needs fsspec: pip install 'tridist[fsspec]' (or use a local path)"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        return f"fsspec knows no protocol {protocol!r}; use a local path or e.g. s3://, gs://"
    except ImportError as err:
        return f"protocol {protocol!r} needs a package fsspec could not import ({err})"
    return None
