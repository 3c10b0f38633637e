#!/bin/sh
# Runs a command with OpenBLAS's kernels for this processor. A DYNAMIC_ARCH OpenBLAS (Debian's
# and Ubuntu's) picks its kernels by CPU model at load time; a processor newer than the library
# (Debian 12's 0.3.21 on Intel Emerald Rapids, model 207, say) gets its generic "Prescott"
# kernels: SSE3, several times slower at sgemm (docs/results.md, "OpenBLAS on a processor it does
# not know"). Then, unless OPENBLAS_CORETYPE is already set, this sets it to the kernels the
# processor's instructions allow (SkylakeX with AVX-512, Haswell with AVX2 and FMA) and says so.
# Usage: sh scripts/with-blas.sh COMMAND [ARGS...]
set -eu

if [ -z "${OPENBLAS_CORETYPE:-}" ] && [ -r /proc/cpuinfo ] && command -v python3 >/dev/null 2>&1; then
    core=$(OPENBLAS_VERBOSE=2 python3 -c '
import ctypes, ctypes.util
for name in ("libopenblas.so.0", ctypes.util.find_library("openblas"), "libblas.so.3"):
    try:
        lib = ctypes.CDLL(name)
        f = lib.openblas_get_corename
        f.restype = ctypes.c_char_p
        print(f().decode())
        break
    except (OSError, AttributeError, TypeError):
        pass
' 2>/dev/null | tail -n 1 || true)
    flags=$(grep -m 1 '^flags' /proc/cpuinfo || true)
    has() { case " $flags " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
    want=""
    case "$core" in
        [Pp]rescott | [Cc]ore2 | [Pp]enryn | [Nn]ehalem | [Dd]unnington | [Aa]tom | [Kk]atmai | [Cc]oppermine | [Nn]orthwood | [Bb]anias)
            if has avx512f && has avx512bw && has avx512dq && has avx512vl; then
                want=SkylakeX
            elif has avx2 && has fma; then
                want=Haswell
            fi
            ;;
    esac
    if [ -n "$want" ]; then
        echo "fips: OpenBLAS does not know this processor and would use its generic '$core' kernels; using OPENBLAS_CORETYPE=$want (set OPENBLAS_CORETYPE to choose yourself)" >&2
        OPENBLAS_CORETYPE=$want
        export OPENBLAS_CORETYPE
    fi
fi
exec "$@"
