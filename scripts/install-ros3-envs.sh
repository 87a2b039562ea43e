#!/usr/bin/env bash
# Two small virtual environments with h5py's ros3 driver, one per generation of
# HDF5's read-only S3 driver, for tests/test_s3_clients.py (PyPI's h5py wheels
# have no ros3). Each also has PyNWB, to test NWBHDF5IO(..., driver="ros3").
#
#   .venv-hdf5-1.10  Debian's python3-h5py (HDF5 1.10.8: ros3 takes any http(s)
#                    URL) through --system-site-packages, with PyNWB 2.x (the
#                    last line that runs on its h5py 3.7 and numpy 1.24). pip
#                    cannot see Debian's h5py (its dist-info has another name),
#                    so it installs PyPI's, which is then removed again.
#   .venv-hdf5-2     PyPI's h5py-s3 (h5py built on HDF5 2.x with ros3, which
#                    takes s3://bucket/key and AWS_ENDPOINT_URL_S3), installed
#                    over the plain h5py that PyNWB brings.
#
# Idempotent: each venv is built once (a stamp file says it is complete).
set -euo pipefail
cd "$(dirname "$0")/.."

old=.venv-hdf5-1.10
if [ ! -f "$old/.stamp" ]; then
    rm -rf "$old"
    /usr/bin/python3 -m venv --system-site-packages "$old"
    "$old/bin/pip" install -q --disable-pip-version-check 'pynwb>=2.8,<3' 'hdmf<4' 'numpy<1.25'
    "$old/bin/pip" uninstall -y -q h5py numpy
    "$old/bin/python" -c "import h5py, pynwb; assert 'ros3' in h5py.registered_drivers()"
    touch "$old/.stamp"
fi

new=.venv-hdf5-2
if [ ! -f "$new/.stamp" ]; then
    rm -rf "$new"
    python3 -m venv "$new"
    "$new/bin/pip" install -q --disable-pip-version-check 'pynwb>=3'
    "$new/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps 'h5py-s3==3.16.0'
    "$new/bin/python" -c "
import h5py, pynwb
assert 'ros3' in h5py.registered_drivers()
assert int(h5py.version.hdf5_version.split('.')[0]) >= 2, h5py.version.hdf5_version"
    touch "$new/.stamp"
fi
