# Two commands do all set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: run test test-fast test-deps lint format clean bench bench-quick bench-scale bench-httpfill bench-overshoot bench-coldfill bench-buffermemory bench-layouts bench-writesize bench-sharing bench-s3 bench-warm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

## run: start the daemon on its defaults (127.0.0.1:8080); pass flags with ARGS="..."
run: $(STAMP)
	$(BIN)/nwbcache serve $(ARGS)

## test: lint, type-check and run the whole suite
test: lint test-deps
	$(BIN)/pytest

## test-fast: the pure and in-process tests only (under a minute): no lint, no system
## tools, no child processes; the tests marked `slow` are left out
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow" -q -n 2

# System tools the tests drive (curl, ...), from Debian's packages if missing, and
# the two ros3-enabled h5py environments (HDF5 1.10 and 2.x) of the S3 client tests.
test-deps:
	./scripts/install-test-deps.sh
	./scripts/install-ros3-envs.sh

## bench: the whole side-by-side suite (>= 1 GB files, nginx, wrk; ~45 min); table + bench/results-full.json
bench: $(STAMP) test-deps
	$(BIN)/python -m bench.suite --scale full $(ARGS)

## bench-quick: the same suite on smaller files (~10 min); bench/results-quick.json
bench-quick: $(STAMP) test-deps
	$(BIN)/python -m bench.suite --scale quick $(ARGS)

## bench-scale: the daemon at 100k..2M cached blocks of 4 KiB (fill, start-up, reconcile,
## eviction, status, check; ~10 GB of disk, ~1 h); bench/results-scale.json
bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale $(ARGS)

## bench-httpfill: issue 11's check through HTTP alone: 1M blocks of 4 KiB filled through the
## daemon, kill -9 mid-fill, restart, everything read back byte-exact (~4 GB, ~10 min);
## bench/results-httpfill.json
bench-httpfill: $(STAMP)
	$(BIN)/python -m bench.httpfill $(ARGS)

## bench-overshoot: 8 clients fill 8,000 small objects (1-8 blocks of 4 KiB) through a 50M
## cache, du sampled: how far over --cache-size it goes and where it ends (3 runs, ~2 min);
## bench/results-overshoot.json
bench-overshoot: $(STAMP)
	$(BIN)/python -m bench.overshoot $(ARGS)

## bench-coldfill: a cold fill through nwbcache against nginx's slice cache, same origin,
## same reads (256 MiB in 16 MiB ranges, 4 streams, 6 runs; ~2 min); bench/results-coldfill.json;
## ARGS="--baseline REV" also runs the daemon at git revision REV and compares run by run;
## ARGS="--primed": each server fills a second object first (bench/results-coldfill-primed.json)
bench-coldfill: $(STAMP) test-deps
	$(BIN)/python -m bench.coldfill $(ARGS)

## bench-buffermemory: RSS of a daemon of 8 workers at rest, at the peak of 256 streams and
## after, by --buffer-memory (1280M, auto, 256M); bench/results-buffermemory.json
bench-buffermemory: $(STAMP) test-deps
	$(BIN)/python -m bench.buffermemory $(ARGS)

## bench-layouts: the storage costs of the two layouts (a file per block, the cache's own
## publish; a sparse file per version) for writes, reads and eviction (~1 min);
## bench/results-layouts.json
bench-layouts: $(STAMP)
	$(BIN)/python -m bench.layouts $(ARGS)

## bench-writesize: what the size of a write call costs in the page cache: 1 GiB written by
## 4 threads in calls of 1 MiB .. 16 KiB, after memory was freed two ways (~2.5 min);
## bench/results-writesize.json
bench-writesize: $(STAMP)
	$(BIN)/python -m bench.writesize $(ARGS)

## bench-sharing: --workers 2 + a second daemon on one cache dir under 40 cold readers
## (upstream bytes / object bytes), and warm 4 KiB ranges against nginx with 1 and auto
## workers (~4 min); bench/results-sharing.json
bench-sharing: $(STAMP) test-deps
	$(BIN)/python -m bench.sharing $(ARGS)

## bench-s3: PyNWB through the S3 endpoint (s3fs, ros3 on HDF5 2.x and 1.10) against remfile,
## warm and cold, on the quick-scale files (~5 min); bench/results-s3clients.json
bench-s3: $(STAMP) test-deps
	$(BIN)/python -m bench.s3clients $(ARGS)

## bench-warm: `nwbcache warm` of a 20-file dandiset against 20 cold PyNWB opens, then
## io.read() after it (origin requests, time against fully warm); bench/results-warm.json
bench-warm: $(STAMP)
	$(BIN)/python -m bench.warm $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check client proxy tests bench
	$(BIN)/ruff format --check client proxy tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format client proxy tests bench
	$(BIN)/ruff check --fix client proxy tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .bench-data
