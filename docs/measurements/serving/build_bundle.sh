#!/usr/bin/env bash
# Builds .whl/serve/serve-cp312.tar.xz (git-ignored): PyTriton 0.7.0, tritonclient 2.73.0 and what
# the device machine (Python 3.12 venv, torch, NumPy 2, grpcio/protobuf, no network) lacks, cut to
# fit one device call beside the working tree (64 MiB together). Run here, from the repository root:
#   bash docs/measurements/serving/build_bundle.sh [OUT.tar.xz]          (~5 min: 85 MB of downloads, xz -9)
# Layout (unpacked by docs/measurements/serving/device_setup.sh into /tmp/site):
#   py/        PYTHONPATH: nvidia-pytriton, tritonclient, pyzmq, sh, python-rapidjson, gevent,
#              geventhttpclient, greenlet, zope.event, zope.interface, brotli, polygraphy
#   np1/       numpy 1.26.4, for Triton's Python-backend stub alone (its pybind11 predates NumPy 2)
#   py-grpc/   grpcio 1.85.3 + protobuf 6.33.6, used only where the machine's are older than what
#              tritonclient 2.73's generated code checks for (grpcio >= 1.81.1, protobuf >= 6.33.5)
#   libpython/ Ubuntu 24.04's libpython3.12.so.1.0 (3.12.3-1ubuntu0.17), used only where the loader
#              finds none (the stub links it by name); its signature is not checked here (no Ubuntu key)
set -euo pipefail
OUT=${1:-.whl/serve/serve-cp312.tar.xz}
mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
py=(--only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}")
main=(nvidia-pytriton==0.7.0 tritonclient==2.73.0 pyzmq==27.3.0 sh==2.4.0 python-rapidjson==1.25 gevent==26.9.0
      geventhttpclient==2.6.1 greenlet==3.3.2 zope.event==6.2 zope.interface==8.7 brotli==1.2.1 polygraphy==0.53.6)
python3 -m pip download -q --no-deps "${py[@]}" -d "$T/whl" "${main[@]}" numpy==1.26.4 grpcio==1.85.3 protobuf==6.33.6
# Ubuntu 24.04's libpython3.12 (apt with a sources list of its own; the machine's apt is not touched)
mkdir -p "$T/apt/lists/partial" "$T/apt/cache/archives/partial"
for suite in noble-updates noble-security noble; do
  echo "deb [arch=amd64 trusted=yes] http://archive.ubuntu.com/ubuntu $suite main"
done > "$T/apt/sources.list"
apt_o=(-o Dir::Etc::SourceList="$T/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent -o Dir::State::Lists="$T/apt/lists"
       -o Dir::Cache="$T/apt/cache" -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Debug::NoLocking=1)
apt-get -qq "${apt_o[@]}" update 2>&1 | grep -v "NO_PUBKEY\|not signed\|GPG error" || true
(cd "$T/whl" && apt-get -qq "${apt_o[@]}" download libpython3.12t64=3.12.3-1ubuntu0.17 2>&1 | grep -v unsandboxed || true)

S=$T/stage
inst=(python3 -m pip install -q --no-deps --no-compile --no-cache-dir --no-index "${py[@]}")
"${inst[@]}" --target "$S/py" $(ls "$T"/whl/*.whl | grep -v -E '/(numpy|grpcio|protobuf)-')
"${inst[@]}" --target "$S/np1" "$T"/whl/numpy-1.26.4-*.whl
"${inst[@]}" --target "$S/py-grpc" "$T"/whl/grpcio-*.whl "$T"/whl/protobuf-*.whl
mkdir -p "$S/libpython" && dpkg -x "$T"/whl/libpython3.12t64_*.deb "$T/deb"
cp "$T/deb/usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0" "$S/libpython/"
# cut what serving does not need
ts=$S/py/pytriton/tritonserver
rm -rf "$ts"/python_backend_stubs/3.{8,9,10,11,13} "$S"/py/nvidia_pytriton.libs/libpython3-*.13.so.1.0 \
       "$S"/py/bin "$S"/py/include "$S"/py/rapidjson-stubs "$S"/np1/bin
find "$S" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
for f in "$S"/py/rapidjson.*.so "$S"/py/_brotli.*.so "$S"/py/greenlet/_greenlet.*.so "$S"/py/geventhttpclient/_parser.*.so \
         "$S"/py/zope/interface/_zope_interface_coptimizations.*.so; do strip --strip-debug "$f"; done
strip --strip-unneeded "$S"/py/nvidia_pytriton.libs/libtritonserver-*.so "$ts/bin/tritonserver"
# PyTriton takes a pytriton outside every site-packages folder for a source checkout and looks
# for its libraries in tritonserver/external_libs
ln -sfn ../../nvidia_pytriton.libs "$ts/external_libs"
help=$("$ts/bin/tritonserver" --help 2>&1 || true)   # it still starts (and exits 1 after the usage)
[[ "$help" == *"Usage: tritonserver"* ]] || { echo "tritonserver no longer starts: ${help:0:300}"; exit 1; }
{
  echo "mame-deploy serve bundle for the device (CPython 3.12, x86-64, glibc >= 2.35); built $(date -u +%F)"
  echo "layout and cuts: docs/measurements/serving/build_bundle.sh; sources (sha256 of the downloaded files):"
  (cd "$T/whl" && sha256sum ./*)
} > "$S/SOURCES.txt"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=2026-12-01 -C "$S" -cf - SOURCES.txt py np1 py-grpc libpython \
    | xz -9 -T2 > "$OUT.part"
mv "$OUT.part" "$OUT"
ls -l "$OUT"
