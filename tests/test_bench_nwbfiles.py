"""The benchmark's NWB file generator (bench/nwbfiles.py), at its smoke scale."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO

from bench import nwbfiles

# Slow (not in make test-fast): writes the benchmark's NWB files with PyNWB.
pytestmark = pytest.mark.slow


def _read(path: Path) -> tuple[NWBHDF5IO, Any]:
    io = NWBHDF5IO(str(path), "r")
    return io, io.read()


def test_smoke_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {f.kind: f for f in nwbfiles.ensure_files(tmp_path, "smoke")}
    assert set(files) == {"ecephys", "imaging", "icephys"}
    assert capsys.readouterr().err.count("nwbfiles: wrote") == 3
    scale = nwbfiles.SCALES["smoke"]

    for f in files.values():
        assert f.path == tmp_path / f"{f.kind}-smoke.nwb"
        assert f.size == f.path.stat().st_size > 0
        assert (tmp_path / f"{f.kind}-smoke.json").exists()
        assert not list(tmp_path.glob(f".{f.kind}-smoke.partial*"))

    # The slice datasets: the layout the benchmark workloads rely on.
    with h5py.File(files["ecephys"].path, "r") as h5:
        ds = h5[files["ecephys"].slice_dataset]
        assert (ds.shape, ds.dtype, ds.chunks, ds.compression) == (
            (3000, 384),
            np.dtype("int16"),
            (1024, 64),
            None,
        )
    with h5py.File(files["imaging"].path, "r") as h5:
        ds = h5[files["imaging"].slice_dataset]
        assert (ds.shape, ds.dtype, ds.chunks, ds.compression) == (
            (256, 64, 64),
            np.dtype("uint16"),
            (4, 64, 64),
            "gzip",
        )
        assert ds[0].std() > 0  # not an empty (fill-value) movie
    with h5py.File(files["icephys"].path, "r") as h5:
        ds = h5[files["icephys"].slice_dataset]
        assert files["icephys"].slice_dataset == "acquisition/data_00002_AD0/data"
        assert ds.dtype == np.dtype("float32") and ds.ndim == 1 and 5_000 <= ds.shape[0] <= 20_000
    assert [files[k].rate for k in ("ecephys", "imaging", "icephys")] == [30_000.0, 30.0, 20_000.0]

    # PyNWB reads them back without complaint, with the expected contents.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io, nwb = _read(files["ecephys"].path)
        with io:
            series = nwb.acquisition["ElectricalSeries"]
            assert series.rate == 30_000.0 and series.conversion == pytest.approx(2.34375e-6)
            assert len(nwb.electrodes) == 384 and len(series.electrodes) == 384
            params = scale["ecephys"]
            assert isinstance(params, nwbfiles.EcephysParams)
            assert len(nwb.units) == params.n_units and len(nwb.trials) == params.n_trials
            duration = params.n_samples / params.rate
            for unit in range(len(nwb.units)):
                spikes = nwb.units.get_unit_spike_times(unit)
                assert np.all(np.diff(spikes) >= 0) and np.all((spikes >= 0) & (spikes <= duration))
            assert nwb.trials.stop_time[-1] <= duration

        io, nwb = _read(files["imaging"].path)
        with io:
            ophys = nwb.processing["ophys"]
            assert len(ophys["ImageSegmentation"]["PlaneSegmentation"]) == 10
            assert ophys["Fluorescence"]["RoiResponseSeries"].data.shape == (256, 10)
            assert nwb.acquisition["TwoPhotonSeries"].rate == 30.0

        io, nwb = _read(files["icephys"].path)
        with io:
            assert len(nwb.acquisition) == len(nwb.stimulus) == 5
            assert len(nwb.intracellular_recordings) == 5
            assert len(nwb.icephys_simultaneous_recordings) == 5
            assert len(nwb.icephys_sequential_recordings) == 5
            assert len(nwb.icephys_repetitions) == 2
            assert list(nwb.icephys_experimental_conditions["condition"][:]) == [
                "ACSF",
                "ACSF + 10 uM carbachol",
            ]
            sweeps = sorted(s.sweep_number for s in nwb.acquisition.values())
            assert sweeps == [0, 1, 2, 3, 4]
    assert [str(w.message) for w in caught] == []

    # Cached: a second call rewrites nothing...
    mtimes = {k: f.path.stat().st_mtime_ns for k, f in files.items()}
    again = nwbfiles.ensure_files(tmp_path, "smoke")
    assert again == list(files.values())
    assert {f.kind: f.path.stat().st_mtime_ns for f in again} == mtimes
    assert "wrote" not in capsys.readouterr().err

    # ...unless the manifest no longer vouches for the file.
    (tmp_path / "icephys-smoke.json").unlink()
    nwbfiles.ensure_files(tmp_path, "smoke", kinds=("icephys",))
    assert capsys.readouterr().err.count("nwbfiles: wrote") == 1
    assert (tmp_path / "icephys-smoke.json").exists()
