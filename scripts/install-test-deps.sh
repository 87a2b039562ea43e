#!/usr/bin/env bash
# System tools the test suite drives for real (not Python packages: those come
# from pyproject.toml). Installs only what is missing, from Debian's packages.
#
#   curl        tests/test_real_clients.py and friends (a real HTTP client)
#   prometheus  tests/test_deploy_*.py: /usr/bin/prometheus scrapes a real
#               daemon, /usr/bin/promtool checks and unit-tests deploy/prometheus
#   chromium    tests/test_status_browser.py renders the status page headless
#   systemd     tests/test_deploy_files.py: systemd-analyze verify/security on the unit
#   nginx-light the benchmark's generic range cache (proxy_cache + slice), and
#   wrk         its raw-serving load generator (bench/, tests/test_bench_smoke.py)
#   haproxy     tests/test_cluster.py: deploy/cluster/haproxy.cfg in front of real daemons
#   awscli      tests/test_s3_clients.py: the AWS CLI against the S3 endpoint
#   python3-h5py  HDF5 1.10 with the ros3 driver (PyPI's h5py has none), for the
#               ros3 tests; scripts/install-ros3-envs.sh builds their venvs on it
set -euo pipefail

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
# One package ships both binaries; tests look for them in PATH or /usr/bin.
if ! { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } &&
    ! { [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; }; then
    need+=(prometheus)
fi
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ -x /usr/bin/aws ] || need+=(awscli)
[ -d /usr/lib/python3/dist-packages/h5py ] || need+=(python3-h5py python3-venv)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: missing ${need[*]} and no apt-get to install them" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-test-deps: installing ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
