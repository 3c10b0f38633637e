#!/bin/sh
# Makes sure the system LAPACK/BLAS that ndarray-linalg links against (OpenBLAS) is installed.
# On Debian/Ubuntu it installs `libopenblas-dev` when missing (with sudo when not root); elsewhere
# it explains what to install. Build with `--no-default-features --features openblas-static` (or
# netlib-static, intel-mkl-static) to avoid the system library altogether.
set -eu

if command -v dpkg-query >/dev/null 2>&1; then
    if dpkg-query -W -f='${Status}' libopenblas-dev 2>/dev/null | grep -q "install ok installed"; then
        exit 0
    fi
    echo "fips: installing libopenblas-dev (the LAPACK backend ndarray-linalg links against)..." >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas-dev >/dev/null
    exit 0
fi

if ldconfig -p 2>/dev/null | grep -q "libopenblas\.so"; then
    exit 0
fi
echo "fips: OpenBLAS with LAPACK was not found. Install it with your package manager" >&2
echo "      (e.g. 'dnf install openblas-devel', 'brew install openblas'), or build with" >&2
echo "      '--no-default-features --features openblas-static'." >&2
exit 1
