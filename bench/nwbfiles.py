"""Realistic, deterministic NWB files for the streaming benchmarks.

Three kinds, written with PyNWB from a seeded numpy RNG, so two runs give the
same datasets (only HDF5's own bookkeeping may differ):

  ecephys  a Neuropixels-like recording: 384-channel int16 ElectricalSeries at
           30 kHz (>= 1e9 bytes at scale "full"), electrodes, units, trials.
           The big-sequential-read case.
  imaging  two-photon: a (frames, 512, 512) uint16 TwoPhotonSeries, gzip'd,
           plus ROIs (pixel masks) and their fluorescence traces.
  icephys  patch clamp: hundreds of small sweeps and the icephys tables; many
           groups, attributes and small datasets, i.e. the metadata-bound case.

Large datasets are produced buffer by buffer through an hdmf chunk iterator,
so memory stays ~50 MB whatever the file size.

    .venv/bin/python -m bench.nwbfiles --scale quick [--data-dir .bench-data]

Or from a benchmark: ``ensure_files(data_dir, scale)`` (cached by manifest).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from hdmf.backends.hdf5.h5_utils import H5DataIO  # type: ignore[import-untyped]
from hdmf.data_utils import GenericDataChunkIterator  # type: ignore[import-untyped]
from pynwb import NWBHDF5IO, NWBFile
from pynwb.ecephys import ElectricalSeries
from pynwb.file import Subject
from pynwb.icephys import CurrentClampSeries, CurrentClampStimulusSeries
from pynwb.misc import Units
from pynwb.ophys import (
    DfOverF,
    Fluorescence,
    ImageSegmentation,
    OpticalChannel,
    TwoPhotonSeries,
)

# Bump when the content of generated files changes: cached files whose
# manifest holds another version are regenerated.
GENERATOR_VERSION = 1
SEED = 20240611
KINDS = ("ecephys", "imaging", "icephys")

SESSION_START = datetime(2024, 3, 14, 10, 30, tzinfo=timezone(timedelta(hours=-7)))

# A 2-D selection of an iterator buffer, as hdmf hands it to _get_data.
Selection = tuple[slice, ...]
Int16Array = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BenchFile:
    kind: str  # "ecephys" | "imaging" | "icephys"
    path: Path
    size: int  # bytes on disk
    slice_dataset: str  # HDF5 path of the dataset the "slice" and "scan" workloads read
    rate: float  # samples (or frames) per second of that dataset


@dataclass(frozen=True)
class EcephysParams:
    n_samples: int
    # 64 channels wide, as neuroconv's get_electrical_series_chunk_shape (a
    # chunk is a time window of a neighbourhood of sites). In time, 16384
    # frames (0.55 s) make a 2 MiB chunk: between the ~1 MB that hdmf and
    # neuroconv recommended until late 2023 (most ecephys files on DANDI were
    # written then) and neuroconv's current 10 MB (78125 frames). A 1 s x 64 ch
    # "slice" then spans 2-3 chunks rather than part of one.
    chunk_frames: int = 16384
    chunk_channels: int = 64
    n_channels: int = 384
    rate: float = 30_000.0
    n_units: int = 300
    n_trials: int = 500


@dataclass(frozen=True)
class ImagingParams:
    n_frames: int
    height: int = 512
    width: int = 512
    # Whole frames, 4 per chunk: 2 MiB raw (~1.2 MiB after gzip), like the
    # ecephys chunks. neuroconv now picks 19 frames (10 MB); files written
    # before late 2023 mostly have ~1 MB or one-frame chunks.
    chunk_frames: int = 4
    # gzip level 4 is h5py's and neuroconv's default filter for ophys, and
    # most two-photon series on DANDI are gzip'd: readers pay inflate cost here.
    gzip_level: int = 4
    rate: float = 30.0
    n_rois: int = 200
    roi_radius: int = 6


@dataclass(frozen=True)
class IcephysParams:
    n_sweeps: int
    rate: float = 20_000.0
    sweeps_per_block: int = 5  # consecutive sweeps of one protocol = one sequential recording


Params = EcephysParams | ImagingParams | IcephysParams

SCALES: dict[str, dict[str, Params]] = {
    # 1_350_000 x 384 x 2 bytes = 1.037e9 bytes: 45 s of Neuropixels AP band.
    # 576 x 512 x 512 x 2 bytes = 302 MB raw (19 s at 30 Hz).
    "full": {
        "ecephys": EcephysParams(n_samples=1_350_000),
        "imaging": ImagingParams(n_frames=576),
        "icephys": IcephysParams(n_sweeps=300),
    },
    # 270_000 x 768 = 207 MB. Imaging: 480 x 256 x 256 x 2 = 63 MB raw, in
    # 2 MiB chunks like "full"; 120 frames of 512 x 512 would make time the
    # shortest axis, which nwbinspector flags as a CRITICAL orientation error.
    "quick": {
        "ecephys": EcephysParams(n_samples=270_000, n_trials=100),
        "imaging": ImagingParams(n_frames=480, height=256, width=256, chunk_frames=16),
        "icephys": IcephysParams(n_sweeps=100),
    },
    # ~2 MB each: small chunks so the files still have several of them.
    "smoke": {
        "ecephys": EcephysParams(n_samples=3_000, chunk_frames=1024, n_units=10, n_trials=10),
        # More frames than pixels a side: time must stay the longest axis
        # (nwbinspector flags the orientation otherwise).
        "imaging": ImagingParams(n_frames=256, height=64, width=64, n_rois=10, roi_radius=4),
        "icephys": IcephysParams(n_sweeps=5, sweeps_per_block=1),  # still >1 row per table
    },
}


# ---------------------------------------------------------------------------
# Shared pieces


class _SyntheticIterator(GenericDataChunkIterator):  # type: ignore[misc]
    """Hands hdmf one buffer at a time, computed by ``make(selection)``.

    ``make`` must depend on the selection only (not on call order), which keeps
    the output deterministic whatever order hdmf asks in.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        chunk_shape: tuple[int, ...],
        buffer_shape: tuple[int, ...],
        make: Callable[[Selection], npt.NDArray[Any]],
    ) -> None:
        # GenericDataChunkIterator.__init__ calls _get_maxshape/_get_dtype.
        self._shape = shape
        self._np_dtype = dtype
        self._make = make
        super().__init__(chunk_shape=chunk_shape, buffer_shape=buffer_shape)

    def _get_data(self, selection: Selection) -> npt.NDArray[Any]:
        return self._make(selection)

    def _get_maxshape(self) -> tuple[int, ...]:
        return self._shape

    def _get_dtype(self) -> np.dtype[Any]:
        return self._np_dtype


def _buffer_len(chunk: int, total: int, target: int) -> int:
    """Largest multiple of ``chunk`` up to ``target``; the whole axis if shorter
    (hdmf wants buffers that chunks divide, except a buffer spanning the axis)."""
    n = max(chunk, (target // chunk) * chunk)
    return total if n >= total else n


def _rng(kind: str, *stream: int) -> np.random.Generator:
    return np.random.default_rng([SEED, KINDS.index(kind), *stream])


def _new_nwbfile(kind: str, scale: str, description: str) -> Any:
    # Identifier from the seed, not uuid4: the same parameters give the same file.
    ident = uuid.uuid5(uuid.NAMESPACE_URL, f"nwbcache-bench/{kind}/{scale}/{SEED}")
    return NWBFile(
        session_description=description,
        identifier=str(ident),
        session_start_time=SESSION_START,
        file_create_date=SESSION_START + timedelta(days=30),
        session_id=f"{kind}-{scale}",
        experimenter=["Doe, Jane"],
        lab="Benchmark Lab",
        institution="nwbcache",
        experiment_description=f"Synthetic {kind} session generated by bench/nwbfiles.py.",
        keywords=["benchmark", "synthetic", kind],
    )


def _mouse(genotype: str) -> Any:
    return Subject(
        subject_id="bench-mouse-001",
        species="Mus musculus",
        age="P90D",
        sex="M",
        genotype=genotype,
        strain="C57BL/6J",
        description="synthetic subject",
    )


# ---------------------------------------------------------------------------
# ecephys


def _ecephys_maker(p: EcephysParams, rng: np.random.Generator) -> Callable[[Selection], Int16Array]:
    """Gaussian noise plus a shared slow (LFP-like) oscillation, in ADC counts.

    Drawing 5e8 normals would cost more than writing them, so a bank of ~70k
    noise frames is drawn once and each chunk row reads it from its own
    offset; the oscillation is computed from absolute time, so chunks never
    repeat byte for byte.
    """
    bank_frames = min(p.n_samples, 65_536 + 4_099)  # not a multiple of the chunk length
    bank = np.empty((bank_frames, p.n_channels), dtype=np.int16)
    for start in range(0, bank_frames, 8_192):  # in pieces: one float64 draw is 200 MB
        piece = bank[start : start + 8_192]
        piece[:] = rng.normal(0.0, 12.0, size=piece.shape)
    gain = rng.uniform(10.0, 40.0, size=p.n_channels).astype(np.float32)
    freqs = np.array([1.3, 3.7, 8.1])  # Hz: delta/theta-ish
    phases = rng.uniform(0.0, 2 * math.pi, size=freqs.size)

    def make(sel: Selection) -> Int16Array:
        rows, cols = sel[0], sel[1]
        # Each chunk row reads the bank from its own offset. A function of the
        # absolute sample only, so the buffer size does not change the data.
        sample = np.arange(rows.start, rows.stop)
        idx = (sample + (sample // p.chunk_frames) * 7_919) % bank_frames
        out: Int16Array = bank[idx, cols]
        t = sample / p.rate
        slow = np.sin(2 * math.pi * freqs[None, :] * t[:, None] + phases).sum(axis=1)
        slow32 = slow.astype(np.float32)[:, None]
        col_gain = gain[cols]
        for c in range(0, out.shape[1], 64):  # by column blocks: small float temporaries
            out[:, c : c + 64] += (slow32 * col_gain[c : c + 64]).astype(np.int16)
        return out

    return make


def _add_electrodes(nwbfile: Any, p: EcephysParams, rng: np.random.Generator) -> None:
    model = nwbfile.create_device_model(
        name="Neuropixels 1.0",
        manufacturer="IMEC",
        model_number="PRB_1_4_0480_1",
        description="960-site single-shank silicon probe, 384 channels recorded at once",
    )
    probe = nwbfile.create_device(
        name="NeuropixelsImec0", description="Neuropixels 1.0 probe", model=model
    )
    group = nwbfile.create_electrode_group(
        name="Imec0",
        description="single-shank Neuropixels 1.0, 384 recorded sites",
        location="VISp, CA1, DG",
        device=probe,
    )
    nwbfile.add_electrode_column(name="channel_name", description="acquisition channel name")
    nwbfile.add_electrode_column(
        name="inter_sample_shift", description="ADC sample delay, as a fraction of a sample"
    )
    nwbfile.add_electrode_column(name="shank_electrode_number", description="site on the shank")
    regions = ("VISp5", "VISp6a", "CA1", "DG-mo", "DG-po", "TH")
    imp = rng.normal(150e3, 20e3, size=p.n_channels)
    for ch in range(p.n_channels):
        # Checkerboard geometry of NP 1.0: 4 columns, 20 um rows, two sites per row.
        rel_x = float((43, 11, 59, 27)[ch % 4])
        rel_y = float(20 * (ch // 2))
        nwbfile.add_electrode(
            group=group,
            location=regions[min(len(regions) - 1, ch * len(regions) // p.n_channels)],
            x=8_400.0 + rel_x,
            y=3_800.0 - rel_y,
            z=6_100.0,
            rel_x=rel_x,
            rel_y=rel_y,
            imp=float(imp[ch]),
            filtering="AP band: 300 Hz high-pass, 10 kHz low-pass (hardware)",
            reference="tip",
            channel_name=f"AP{ch}",
            inter_sample_shift=float((ch % 13) / 13),
            shank_electrode_number=ch,
        )


def _add_units(nwbfile: Any, p: EcephysParams, rng: np.random.Generator) -> None:
    duration = p.n_samples / p.rate
    nwbfile.units = Units(
        name="units",
        description="Kilosort-like sorted units",
        electrode_table=nwbfile.electrodes,
        waveform_rate=p.rate,
        waveform_unit="volts",
        resolution=1.0 / p.rate,
    )
    for name, desc in (
        ("quality", "curation label"),
        ("firing_rate", "mean firing rate (Hz)"),
        ("amplitude", "peak-to-trough amplitude (uV)"),
        ("depth", "depth along the probe (um)"),
        ("isi_violations", "fraction of ISIs under 1.5 ms"),
    ):
        nwbfile.units.add_column(name=name, description=desc)
    # Lognormal rates (median ~12 Hz, mean ~20 Hz): a few hundred thousand
    # spikes at scale "full", like a ~300-unit Neuropixels session.
    rates = rng.lognormal(mean=math.log(12.0), sigma=1.0, size=p.n_units)
    t = np.arange(82) / p.rate
    for u in range(p.n_units):
        n = int(rng.poisson(rates[u] * duration))
        spikes = np.sort(np.round(rng.uniform(0.0, duration, n) * p.rate) / p.rate)
        peak = int(rng.integers(0, p.n_channels))
        amp = float(rng.uniform(40.0, 400.0))
        wave = -amp * 1e-6 * np.exp(-(((t - 0.001) / 0.0003) ** 2)) + 0.3 * amp * 1e-6 * np.exp(
            -(((t - 0.0017) / 0.0006) ** 2)
        )
        nwbfile.add_unit(
            spike_times=spikes,
            electrodes=[peak],
            waveform_mean=wave.astype(np.float32),
            quality=str(rng.choice(["good", "mua", "noise"], p=[0.5, 0.4, 0.1])),
            firing_rate=n / duration,
            amplitude=amp,
            depth=20.0 * (peak // 2),
            isi_violations=float(rng.beta(1, 30)),
        )


def _add_trials(nwbfile: Any, p: EcephysParams, rng: np.random.Generator) -> None:
    # Trials tile the recording so every trial has data under it.
    period = p.n_samples / p.rate / p.n_trials
    nwbfile.add_trial_column(name="stimulus_type", description="stimulus shown")
    nwbfile.add_trial_column(name="contrast", description="stimulus contrast (0-1)")
    nwbfile.add_trial_column(name="response_time", description="lick latency (s)")
    nwbfile.add_trial_column(name="correct", description="whether the response was correct")
    for i in range(p.n_trials):
        start = i * period
        nwbfile.add_trial(
            start_time=start,
            stop_time=start + 0.8 * period,
            stimulus_type=str(rng.choice(["grating", "natural_scene", "blank"])),
            contrast=float(rng.choice([0.0, 0.25, 0.5, 1.0])),
            response_time=float(rng.uniform(0.2, 0.6) * period),
            correct=bool(rng.random() < 0.75),
        )


def _write_ecephys(path: Path, scale: str, p: EcephysParams) -> None:
    rng = _rng("ecephys")
    nwbfile = _new_nwbfile(
        "ecephys", scale, "Extracellular recording with a Neuropixels probe during a visual task"
    )
    nwbfile.subject = _mouse("wild type")
    _add_electrodes(nwbfile, p, rng)
    chunk = (p.chunk_frames, p.chunk_channels)
    # 2 chunk rows x all channels: 25 MB buffers at full size (bigger ones
    # only raise peak memory; the write speed is the same).
    buffer = (_buffer_len(p.chunk_frames, p.n_samples, 2 * p.chunk_frames), p.n_channels)
    data = _SyntheticIterator(
        (p.n_samples, p.n_channels), np.dtype(np.int16), chunk, buffer, _ecephys_maker(p, rng)
    )
    nwbfile.add_acquisition(
        ElectricalSeries(
            name="ElectricalSeries",
            description="AP band, raw",
            # Uncompressed on purpose: many raw ecephys files on DANDI are, and
            # inflating 1 GB would make CPU, not the transport under test,
            # dominate the timings.
            data=H5DataIO(data, chunks=chunk),
            electrodes=nwbfile.create_electrode_table_region(
                region=list(range(p.n_channels)), description="all sites"
            ),
            starting_time=0.0,
            rate=p.rate,
            # NP 1.0 AP: 1.2 V range / 1024 levels / gain 500.
            conversion=2.34375e-06,
            filtering="300 Hz high-pass (hardware)",
        )
    )
    _add_units(nwbfile, p, _rng("ecephys", 1))
    _add_trials(nwbfile, p, _rng("ecephys", 2))
    _write(nwbfile, path)


# ---------------------------------------------------------------------------
# imaging


@dataclass(frozen=True)
class _Rois:
    label: npt.NDArray[np.int32]  # (H, W): 0 background, r+1 inside ROI r
    weight: Float32Array  # (H, W): pixel weight inside its ROI
    pixel_masks: list[list[tuple[int, int, float]]]  # per ROI: (x, y, weight)


def _make_rois(p: ImagingParams, rng: np.random.Generator) -> _Rois:
    label = np.zeros((p.height, p.width), dtype=np.int32)
    weight = np.zeros((p.height, p.width), dtype=np.float32)
    masks: list[list[tuple[int, int, float]]] = []
    r = p.roi_radius
    offsets = [
        (dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r
    ]
    for roi in range(p.n_rois):
        cy = int(rng.integers(r, p.height - r))
        cx = int(rng.integers(r, p.width - r))
        mask: list[tuple[int, int, float]] = []
        for dy, dx in offsets:
            w = math.exp(-(dy * dy + dx * dx) / (0.5 * r * r))
            y, x = cy + dy, cx + dx
            label[y, x] = roi + 1  # later ROIs win overlaps in the movie
            weight[y, x] = w
            mask.append((x, y, w))
        masks.append(mask)
    return _Rois(label, weight, masks)


def _calcium_traces(
    p: ImagingParams, rng: np.random.Generator
) -> tuple[Float32Array, Float32Array]:
    """Fluorescence (frames x ROIs) and its dF/F: Poisson events, 0.4 s decay."""
    events = rng.poisson(0.3 / p.rate, size=(p.n_frames, p.n_rois)).astype(np.float32)
    events *= rng.uniform(0.3, 1.5, size=p.n_rois).astype(np.float32)
    decay = math.exp(-1.0 / (0.4 * p.rate))
    dff = np.empty_like(events)
    level = np.zeros(p.n_rois, dtype=np.float32)
    for f in range(p.n_frames):  # frames are few (hundreds): a plain loop is fine
        level = level * decay + events[f]
        dff[f] = level
    baseline = rng.uniform(300.0, 700.0, size=p.n_rois).astype(np.float32)
    return (baseline * (1.0 + dff)).astype(np.float32), dff


def _imaging_maker(
    p: ImagingParams, rois: _Rois, fluo: Float32Array
) -> Callable[[Selection], npt.NDArray[np.uint16]]:
    """Vignetted background + ROI fluorescence + shot noise, in PMT counts."""
    yy, xx = np.mgrid[0 : p.height, 0 : p.width].astype(np.float32)
    cy, cx = (p.height - 1) / 2, (p.width - 1) / 2
    vignette = 1.0 - 0.4 * (((yy - cy) / cy) ** 2 + ((xx - cx) / cx) ** 2) / 2
    texture = 40.0 * np.sin(xx / 23.0) * np.cos(yy / 31.0)
    background = (250.0 * vignette + texture).astype(np.float32)
    # Column 0 is the background "ROI" (adds nothing).
    fluo_padded = np.concatenate([np.zeros((p.n_frames, 1), np.float32), fluo], axis=1)

    def make(sel: Selection) -> npt.NDArray[np.uint16]:
        frames = sel[0]
        # Seeded per frame, so the buffer size does not change the data.
        noise = np.stack(
            [
                np.random.default_rng([SEED, 99, f]).standard_normal(
                    (p.height, p.width), dtype=np.float32
                )
                for f in range(frames.start, frames.stop)
            ]
        )
        signal = background + fluo_padded[frames][:, rois.label] * rois.weight
        movie = signal + noise * np.sqrt(signal) * 1.5
        out: npt.NDArray[np.uint16] = np.clip(movie, 0, 65_535).astype(np.uint16)
        return out[(slice(None), *sel[1:])]

    return make


def _write_imaging(path: Path, scale: str, p: ImagingParams) -> None:
    rng = _rng("imaging")
    nwbfile = _new_nwbfile("imaging", scale, "Two-photon calcium imaging of layer 2/3 of VISp")
    nwbfile.subject = _mouse("Slc17a7-IRES2-Cre/wt;Camk2a-tTA/wt;Ai93(TITL-GCaMP6f)/wt")
    model = nwbfile.create_device_model(
        name="Bergamo II", manufacturer="Thorlabs", description="multiphoton microscope"
    )
    microscope = nwbfile.create_device(
        name="Microscope", description="resonant-scanning two-photon microscope", model=model
    )
    plane = nwbfile.create_imaging_plane(
        name="ImagingPlane",
        optical_channel=OpticalChannel(
            name="OpticalChannel", description="green PMT", emission_lambda=525.0
        ),
        description="L2/3, 175 um below pia",
        device=microscope,
        excitation_lambda=920.0,
        indicator="GCaMP6f",
        location="VISp",
        grid_spacing=[1.6e-6, 1.6e-6],
        grid_spacing_unit="meters",
        origin_coords=[-0.0028, 0.0035],
        origin_coords_unit="meters",
    )
    rois = _make_rois(p, rng)
    fluo, dff = _calcium_traces(p, _rng("imaging", 1))
    shape = (p.n_frames, p.height, p.width)
    chunk = (p.chunk_frames, p.height, p.width)
    # 2 chunks per buffer: the float32 temporaries of a 512 x 512 frame add up.
    buffer = (_buffer_len(p.chunk_frames, p.n_frames, 2 * p.chunk_frames), p.height, p.width)
    data = _SyntheticIterator(
        shape, np.dtype(np.uint16), chunk, buffer, _imaging_maker(p, rois, fluo)
    )
    nwbfile.add_acquisition(
        TwoPhotonSeries(
            name="TwoPhotonSeries",
            description="raw two-photon movie",
            data=H5DataIO(data, chunks=chunk, compression="gzip", compression_opts=p.gzip_level),
            imaging_plane=plane,
            rate=p.rate,
            starting_time=0.0,
            unit="n.a.",
            pmt_gain=0.6,
            scan_line_rate=15_800.0,
        )
    )
    _add_segmentation(nwbfile, p, plane, rois, fluo, dff)
    _write(nwbfile, path)


def _add_segmentation(
    nwbfile: Any,
    p: ImagingParams,
    plane: Any,
    rois: _Rois,
    fluo: Float32Array,
    dff: Float32Array,
) -> None:
    ophys = nwbfile.create_processing_module(name="ophys", description="processed ophys data")
    segmentation = ImageSegmentation(name="ImageSegmentation")
    ophys.add(segmentation)
    # Pixel masks, as suite2p conversions store them: 200 image masks of
    # 512 x 512 would be 200 MB of mostly zeros.
    planes = segmentation.create_plane_segmentation(
        name="PlaneSegmentation",
        description="suite2p-like ROIs",
        imaging_plane=plane,
    )
    planes.add_column(name="is_cell", description="classifier says cell")
    for mask in rois.pixel_masks:
        planes.add_roi(pixel_mask=mask, is_cell=True)
    region = planes.create_roi_table_region(region=list(range(p.n_rois)), description="all ROIs")
    for container, values in (
        (Fluorescence(name="Fluorescence"), fluo),
        (DfOverF(name="DfOverF"), dff),
    ):
        # Into the file before the series: its ROI region must share an
        # ancestor with the PlaneSegmentation (hdmf warns otherwise).
        ophys.add(container)
        container.create_roi_response_series(
            name="RoiResponseSeries",
            description=f"{container.name} of each ROI",
            data=values,
            rois=region,
            unit="n.a.",
            rate=p.rate,
            starting_time=0.0,
        )


# ---------------------------------------------------------------------------
# icephys

# name, duration (s): 5,000-20,000 samples at 20 kHz, like a typical
# long square / short square / ramp current-clamp protocol set.
_PROTOCOLS = (("long_square", 1.0), ("short_square", 0.25), ("ramp", 0.75))


def _stimulus_pa(protocol: str, n: int, rate: float, sweep: int) -> Float32Array:
    t = np.arange(n) / rate
    stim = np.zeros(n, dtype=np.float32)
    if protocol == "long_square":
        stim[(t >= 0.1) & (t < 0.9)] = -110.0 + 20.0 * (sweep % 12)
    elif protocol == "short_square":
        stim[(t >= 0.1) & (t < 0.103)] = 500.0 + 50.0 * (sweep % 10)
    else:
        ramp = (t >= 0.1) & (t < 0.7)
        stim[ramp] = 400.0 * (t[ramp] - 0.1) / 0.6
    return stim


def _response_mv(stim: Float32Array, rate: float, rng: np.random.Generator) -> Float32Array:
    """An RC membrane (150 MOhm, 20 ms) with spikes above -50 mV, plus noise.

    Convolutions by FFT: numpy only, ~1 ms per sweep."""
    n = stim.size
    t = np.arange(n) / rate
    rc = np.exp(-t / 0.02)
    rc /= rc.sum()
    size = 1 << (2 * n - 1).bit_length()
    v = -70.0 + 0.15 * np.fft.irfft(np.fft.rfft(stim, size) * np.fft.rfft(rc, size), size)[:n]
    # Spike probability per sample: 2 Hz per mV above threshold, at most 40 Hz
    # (no refractoriness is modelled; faster firing would pile spikes up).
    drive = np.clip(v + 50.0, 0.0, 20.0) * 2.0 / rate
    spikes = (rng.random(n) < drive).astype(np.float64)
    ap_t = np.arange(int(0.003 * rate)) / rate
    ap = 100.0 * np.exp(-(((ap_t - 0.0005) / 0.0003) ** 2)) - 10.0 * np.exp(-ap_t / 0.002)
    v += np.fft.irfft(np.fft.rfft(spikes, size) * np.fft.rfft(ap, size), size)[:n]
    v += rng.normal(0.0, 0.2, n)
    return v.astype(np.float32)


def _icephys_middle(p: IcephysParams) -> int:
    return p.n_sweeps // 2


def _sweep_name(sweep: int, channel: str) -> str:
    # MIES/IPNWB naming, as in the Allen patch-seq dandisets.
    return f"data_{sweep:05d}_{channel}"


def _write_icephys(path: Path, scale: str, p: IcephysParams) -> None:
    rng = _rng("icephys")
    nwbfile = _new_nwbfile("icephys", scale, "Whole-cell current clamp of a L5 pyramidal neuron")
    nwbfile.subject = _mouse("Rbp4-Cre_KL100/wt;Ai14(RCL-tdT)/wt")
    model = nwbfile.create_device_model(
        name="ITC-18", manufacturer="HEKA", description="data acquisition interface"
    )
    amp = nwbfile.create_device(name="ITC18USB_Dev_0", description="DAC/ADC board", model=model)
    electrode = nwbfile.create_icephys_electrode(
        name="electrode_0",
        description="headstage 0",
        device=amp,
        location="VISp5",  # an Allen CCF acronym, as nwbinspector wants
        slice="350 um coronal slice, ACSF 34 C",
        seal="2.1 GOhm",
        resistance="5.1 MOhm",
        filtering="Bessel 10 kHz",
        initial_access_resistance="12.3 MOhm",
        cell_id="cell_0001",
    )
    # Extra columns, as labs add them (the tables then need a value per row).
    nwbfile.get_intracellular_recordings().add_column(
        name="access_resistance", description="access resistance (Ohm)", category="responses"
    )
    nwbfile.get_icephys_experimental_conditions().add_column(
        name="condition", description="bath solution"
    )
    recordings = _add_sweeps(nwbfile, p, electrode, rng)
    _group_sweeps(nwbfile, p, recordings)
    _write(nwbfile, path)


def _add_sweeps(
    nwbfile: Any, p: IcephysParams, electrode: Any, rng: np.random.Generator
) -> list[int]:
    """One stimulus + response pair per sweep; returns the simultaneous-recording rows."""
    simultaneous: list[int] = []
    start = 0.0
    for sweep in range(p.n_sweeps):
        protocol, duration = _PROTOCOLS[(sweep // p.sweeps_per_block) % len(_PROTOCOLS)]
        n = int(duration * p.rate)
        stim = _stimulus_pa(protocol, n, p.rate, sweep)
        common: dict[str, Any] = dict(
            electrode=electrode,
            rate=p.rate,
            starting_time=start,
            sweep_number=np.uint32(sweep),  # the spec's type; a Python int warns
            gain=float(rng.choice([0.01, 0.02])),
            stimulus_description=f"{protocol}_DA_0",
            comments=json.dumps({"protocol": protocol, "set_sweep": sweep % p.sweeps_per_block}),
        )
        stimulus = CurrentClampStimulusSeries(
            name=_sweep_name(sweep, "DA0"),
            description=f"{protocol} stimulus, sweep {sweep}",
            data=stim,
            conversion=1e-12,  # stored in pA, like MIES
            **common,
        )
        response = CurrentClampSeries(
            name=_sweep_name(sweep, "AD0"),
            description=f"{protocol} response, sweep {sweep}",
            data=_response_mv(stim, p.rate, rng),
            conversion=1e-3,  # stored in mV
            bias_current=float(rng.normal(0.0, 5e-12)),
            bridge_balance=float(rng.normal(12e6, 1e6)),
            capacitance_compensation=float(rng.normal(3e-12, 0.3e-12)),
            **common,
        )
        row = nwbfile.add_intracellular_recording(
            electrode=electrode,
            stimulus=stimulus,
            response=response,
            response_metadata={"access_resistance": float(rng.normal(12e6, 1e6))},
        )
        simultaneous.append(nwbfile.add_icephys_simultaneous_recording(recordings=[row]))
        start += duration + 4.0  # inter-sweep interval
    return simultaneous


def _group_sweeps(nwbfile: Any, p: IcephysParams, simultaneous: list[int]) -> None:
    """Blocks of sweeps -> sequential recordings -> repetitions (one of each
    protocol) -> two experimental conditions (first and second half)."""
    sequential: list[int] = []
    for block, first in enumerate(range(0, p.n_sweeps, p.sweeps_per_block)):
        protocol = _PROTOCOLS[block % len(_PROTOCOLS)][0]
        sequential.append(
            nwbfile.add_icephys_sequential_recording(
                simultaneous_recordings=simultaneous[first : first + p.sweeps_per_block],
                stimulus_type=protocol,
            )
        )
    repetitions = [
        nwbfile.add_icephys_repetition(sequential_recordings=sequential[i : i + len(_PROTOCOLS)])
        for i in range(0, len(sequential), len(_PROTOCOLS))
    ]
    half = max(1, (len(repetitions) + 1) // 2)
    for name, reps in (
        ("ACSF", repetitions[:half]),
        ("ACSF + 10 uM carbachol", repetitions[half:]),
    ):
        if reps:
            nwbfile.add_icephys_experimental_condition(repetitions=reps, condition=name)


# ---------------------------------------------------------------------------
# Files, manifests, caching


def _write(nwbfile: Any, path: Path) -> None:
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)


def _slice_dataset(params: Params) -> tuple[str, float]:
    if isinstance(params, EcephysParams):
        return "acquisition/ElectricalSeries/data", params.rate
    if isinstance(params, ImagingParams):
        return "acquisition/TwoPhotonSeries/data", params.rate
    return f"acquisition/{_sweep_name(_icephys_middle(params), 'AD0')}/data", params.rate


def _generate(path: Path, scale: str, params: Params) -> None:
    if isinstance(params, EcephysParams):
        _write_ecephys(path, scale, params)
    elif isinstance(params, ImagingParams):
        _write_imaging(path, scale, params)
    else:
        _write_icephys(path, scale, params)


def _manifest(kind: str, scale: str, params: Params) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": SEED,
        "kind": kind,
        "scale": scale,
        "params": dataclasses.asdict(params),
    }


def _is_current(path: Path, manifest_path: Path, wanted: dict[str, Any]) -> bool:
    try:
        stored = json.loads(manifest_path.read_text())
        size = path.stat().st_size
    except (OSError, ValueError):
        return False
    # The size check catches a file replaced or truncated behind our back.
    return (
        isinstance(stored, dict)
        and stored.get("size") == size
        and {k: stored.get(k) for k in wanted} == wanted
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise generators of the same file (two benchmark runs at once)."""
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_one(data_dir: Path, kind: str, scale: str, params: Params) -> BenchFile:
    path = data_dir / f"{kind}-{scale}.nwb"
    manifest_path = data_dir / f"{kind}-{scale}.json"
    wanted = _manifest(kind, scale, params)
    with _locked(data_dir / f".{kind}-{scale}.lock"):
        if not _is_current(path, manifest_path, wanted):
            # Manifest first: a crash after this leaves no manifest, so the
            # file is regenerated rather than trusted.
            manifest_path.unlink(missing_ok=True)
            # Ends in .nwb: PyNWB warns about any other suffix.
            partial = data_dir / f".{kind}-{scale}.partial.nwb"
            partial.unlink(missing_ok=True)  # a killed run's leftover
            began = time.perf_counter()
            try:
                _generate(partial, scale, params)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            size = path.stat().st_size
            tmp_manifest = manifest_path.with_suffix(".json.partial")
            tmp_manifest.write_text(json.dumps({**wanted, "size": size}, indent=2) + "\n")
            os.replace(tmp_manifest, manifest_path)
            print(
                f"nwbfiles: wrote {path} ({size / 1e6:.1f} MB) "
                f"in {time.perf_counter() - began:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    dataset, rate = _slice_dataset(params)
    return BenchFile(kind, path, path.stat().st_size, dataset, rate)


def ensure_files(
    data_dir: Path, scale: str = "full", kinds: Sequence[str] = KINDS
) -> list[BenchFile]:
    """The benchmark files of ``scale``, generating those missing or stale."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; one of {sorted(SCALES)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {list(KINDS)}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return [_ensure_one(data_dir, kind, scale, SCALES[scale][kind]) for kind in kinds]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.nwbfiles",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".bench-data",
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args(argv)
    for f in ensure_files(args.data_dir, args.scale, args.kinds):
        print(f"{f.kind:8} {f.size / 1e6:9.1f} MB  {f.rate:8g}/s  {f.slice_dataset}  {f.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
