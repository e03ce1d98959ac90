# Sourced on the device machine (no network, Python 3.12 venv with torch, NumPy 2):
#   source docs/measurements/serving/device_setup.sh .whl/serve/serve-cp312.tar.xz "$OUT" || exit 1
# Unpacks the serve bundle (see docs/serving.md, "On the GPU machine") into /tmp/site, exports
#   PYTHONPATH=/tmp/site/py[:/tmp/site/py-grpc]         PyTriton, tritonclient and their needs
#   MAME_SERVE_STUB_PYTHONPATH=/tmp/site/np1:/tmp/site/py  NumPy 1.26 (and zmq) for Triton's Python-backend
#                                                       stub alone, which ignores PYTHONPATH: serve hands it
#                                                       these through the .pth hook installed below
#   LD_LIBRARY_PATH=/tmp/site/libpython:...             only if the loader finds no libpython3.12.so.1.0
# installs this repository (editable, no dependencies) and the hook, and writes what it found to
# OUT/env.txt. The machine's own NumPy (2.x) stays what torch, onnx and mame-deploy import.
_bundle=${1:?bundle .tar.xz}
_out=${2:?output folder}
mkdir -p "$_out"
_env="$_out/env.txt"
_site=${SERVE_SITE:-/tmp/site}
{
  echo "== bundle: $(ls -l "$_bundle")"
  rm -rf "$_site" && mkdir -p "$_site" && tar -xJf "$_bundle" -C "$_site" && du -sh "$_site"/*
} >> "$_env" 2>&1 || { cat "$_env"; echo "could not unpack $_bundle"; return 1; }
export PYTHONPATH="$_site/py${PYTHONPATH:+:$PYTHONPATH}"
export MAME_SERVE_STUB_PYTHONPATH="$_site/np1:$_site/py"
export PYTHONUNBUFFERED=1
{
  echo "== python: $(command -v python3) $(python3 -VV)"
  python3 -c 'import sys, sysconfig as s; print("base prefix", sys.base_prefix, "| Py_ENABLE_SHARED", s.get_config_var("Py_ENABLE_SHARED"), "| LIBDIR", s.get_config_var("LIBDIR"), "| INSTSONAME", s.get_config_var("INSTSONAME"))'
  ls -l "$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"/libpython* 2>&1 | head -5
  ldconfig -p 2>/dev/null | grep libpython3 | head -5
  head -3 /etc/os-release; ldd --version | head -1
  # tritonclient 2.73's generated code needs grpcio >= 1.81.1 and protobuf >= 6.33.5
  python3 -c 'import grpc, google.protobuf as p; print("machine: grpcio", grpc.__version__, "protobuf", p.__version__)'
} >> "$_env" 2>&1
if ! python3 -c 'import tritonclient.grpc' >> "$_env" 2>&1; then
  export PYTHONPATH="$_site/py:$_site/py-grpc${PYTHONPATH#$_site/py}"
  echo "== tritonclient.grpc needs the bundle's grpcio/protobuf: PYTHONPATH=$PYTHONPATH" >> "$_env"
fi
{
  echo "== pip install -e ."
  python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . 2>&1 | grep -v "^WARNING: Running pip as" | tail -3
  command -v mame-deploy
  python3 -c 'from mame_deploy.serve import install_stub_hook; print("hook", install_stub_hook())'
} >> "$_env" 2>&1
command -v mame-deploy > /dev/null || { cat "$_env"; echo "pip install -e . gave no mame-deploy command"; return 1; }
_stub="$_site/py/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"
_libdir=$(python3 -c 'import sysconfig as s; print(s.get_config_var("LIBDIR") or "")')
_links=$(LD_LIBRARY_PATH="$_libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$_stub" 2>&1)
if [[ "$_links" == *"libpython"*"=> not found"* ]]; then
  export LD_LIBRARY_PATH="$_site/libpython${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== the loader finds no libpython3.12.so.1.0: using the bundle's (Ubuntu 24.04, 3.12.3): LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "$_env"
fi
{
  echo "== versions"
  python3 -c '
import importlib.metadata as md, os
for n in ("numpy", "torch", "nvidia-pytriton", "tritonclient", "grpcio", "protobuf", "pyzmq", "onnx", "onnxruntime",
          "polygraphy", "ml_dtypes", "typer", "rich"):
    try: print(" ", n, md.version(n))
    except md.PackageNotFoundError: print(" ", n, "missing")
for what in ("import numpy; print(\"  main numpy\", numpy.__version__, numpy.__file__)",
             "import torch; print(\"  torch\", torch.__version__, \"cuda\", torch.cuda.is_available())",
             "import pytriton.triton, tritonclient.grpc, tritonclient.http; print(\"  pytriton and tritonclient import\")",
             "from mame_deploy import serve; serve.fix_library_path(); print(\"  serve: LD_LIBRARY_PATH\", os.environ.get(\"LD_LIBRARY_PATH\"), \"| stub libpython missing:\", serve.stub_libpython_missing())",
             "from mame_deploy import serve; print(\"  stub imports\", serve.check_stub(serve.env_stub_pythonpath()))"):
    try: exec(what)
    except Exception as exc: print("  FAILED:", what.split(";")[0], "->", type(exc).__name__, str(exc)[:300])
'
  echo "== stub links (with this LD_LIBRARY_PATH and LIBDIR):"
  LD_LIBRARY_PATH="$_libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$_stub" | grep -E "libpython|not found"
  _help=$("$_site/py/pytriton/tritonserver/bin/tritonserver" --help 2>&1)   # exits 1 after the usage
  if [[ "$_help" == *"Usage: tritonserver"* ]]; then echo "tritonserver --help: ok"
  else echo "tritonserver --help failed: ${_help:0:300}"; ldd "$_site/py/pytriton/tritonserver/bin/tritonserver" | grep "not found"; fi
} >> "$_env" 2>&1
cat "$_env"
unset _bundle _out _env _site _stub _libdir _links _help
