"""What an HDF5 (NWB) file holds, as digests two h5py builds can compare; run
by the ros3 venvs' interpreters to read files through h5py's ros3 driver.

The ros3 venvs (.venv-hdf5-1.10, .venv-hdf5-2; scripts/install-ros3-envs.sh)
have h5py, numpy and PyNWB but not this project, so this module imports only
those and runs as a script there::

    .venv-hdf5-2/bin/python tests/support/ros3.py '{"h5py": [URL, ...], "nwb": [URL, ...]}'

It opens every URL with ``driver="ros3"`` and prints one JSON document:
``{"h5py": {URL: digests}, "nwb": {URL: summary}}``. The tests compute the
same digests and summaries from the local file with the project's own h5py
and PyNWB (import this module) and compare.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np


def content_digests(f: Any) -> dict[str, str]:
    """SHA-256 of every dataset's values (by its path) and of every attribute's
    value (``path@name``; the root's ``/@name``). Object references stand for
    the path they point to: a reference's bytes differ between two opened
    files, its target must not."""
    out: dict[str, str] = {}

    def attrs(prefix: str, obj: Any) -> None:
        for name in obj.attrs:
            out[f"{prefix}@{name}"] = _digest(f, obj.attrs[name])

    def visit(name: str, obj: Any) -> None:
        attrs(name, obj)
        if isinstance(obj, h5py.Dataset):
            out[name] = _digest(f, obj[()])

    attrs("/", f)
    f.visititems(visit)
    return out


def nwb_summary(nwbfile: Any) -> dict[str, Any]:
    """What PyNWB makes of a file: identity fields, the acquisition's data
    (digests), the subject; plain JSON values, the same from any PyNWB."""
    acquisition = {
        name: _digest(None, np.asarray(series.data[()]))
        for name, series in sorted(nwbfile.acquisition.items())
    }
    subject = nwbfile.subject
    return {
        "identifier": nwbfile.identifier,
        "session_description": nwbfile.session_description,
        "session_start_time": nwbfile.session_start_time.isoformat(),
        "acquisition": acquisition,
        "subject": None if subject is None else [subject.subject_id, subject.description],
    }


def _digest(f: Any, value: Any) -> str:
    return hashlib.sha256(_encode(f, value)).hexdigest()


def _encode(f: Any, value: Any) -> bytes:
    """Unambiguous bytes for a value as h5py returns it (dataset or attribute)."""
    if isinstance(value, h5py.Empty):
        dtype: np.dtype[Any] = np.dtype(value.dtype)
        return b"E" + dtype.str.encode()
    if isinstance(value, h5py.RegionReference):
        return b"G" + _target(f, value)
    if isinstance(value, h5py.Reference):
        return b"R" + _target(f, value)
    if isinstance(value, bytes):  # also numpy.bytes_ (fixed-length strings)
        return b"B%d:" % len(value) + value
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return b"S%d:" % len(data) + data
    if isinstance(value, np.void) and value.dtype.hasobject:
        return b"T(" + b",".join(_encode(f, value[n]) for n in value.dtype.names or ()) + b")"
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        shape = repr(array.shape).encode()
        if array.dtype.hasobject:  # variable-length strings, references, compounds of them
            return b"L" + shape + b"[" + b",".join(_encode(f, v) for v in array.flat) + b"]"
        return b"A" + array.dtype.str.encode() + shape + b":" + array.tobytes()
    if isinstance(value, bool | int | float):
        return b"P" + repr(value).encode()
    raise TypeError(f"no encoding for {type(value).__name__}: {value!r}")


def _target(f: Any, ref: Any) -> bytes:
    if f is None or not ref:
        return b"-"
    return str(f[ref].name).encode()


def read_urls(h5py_urls: Sequence[str], nwb_urls: Sequence[str]) -> dict[str, Any]:
    """Open each URL with the ros3 driver: h5py's digests, PyNWB's summaries."""
    result: dict[str, Any] = {"h5py": {}, "nwb": {}}
    for url in h5py_urls:
        with h5py.File(url, "r", driver="ros3") as f:
            result["h5py"][url] = content_digests(f)
    for url in nwb_urls:
        from pynwb import NWBHDF5IO

        with NWBHDF5IO(url, "r", driver="ros3", load_namespaces=True) as io:
            result["nwb"][url] = nwb_summary(io.read())
    return result


def main(argv: Sequence[str]) -> int:
    request = json.loads(argv[0])
    json.dump(read_urls(request.get("h5py", []), request.get("nwb", [])), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
