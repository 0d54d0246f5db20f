#!/bin/sh
# Install Loopline with the extras of one image into the active virtual environment.
#
#   docker/install.sh EXTRAS [REQUIREMENT...]
#
# EXTRAS: "router", "inference", "inference,gpu", "trainer", "trainer,gpu" or "monitor";
# REQUIREMENTs are installed along with them.
#
# Run by every Dockerfile's build stage from a folder holding pyproject.toml, README.md, loopline/
# and services/. Three things a plain `pip install ".[EXTRAS]"` gets wrong:
#
# - torch (trainer extra only) is installed first from TORCH_INDEX_URL, the CPU build unless the
#   GPU override names a CUDA index; PyPI's Linux torch is the multi-GB CUDA build, and once a
#   matching torch is present pip keeps it.
# - onnxruntime (inference and trainer extras) and onnxruntime-gpu (gpu extra) install the same
#   module and whichever lands last wins; with gpu, only onnxruntime-gpu stays, with the CUDA and
#   cuDNN libraries from PyPI so that a python:3.11-slim base is enough.
# - those pip-installed NVIDIA libraries (and TensorRT's) are not on the loader's path: their
#   folders go to $VIRTUAL_ENV/ld.so.conf, which the final stage hands to ldconfig (empty on CPU).
set -eu

extras="${1:?usage: install.sh EXTRAS [REQUIREMENT...]}"
shift
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

has_extra() {
    case ",${extras}," in *",$1,"*) return 0 ;; esac
    return 1
}

# The exact torch requirement of the trainer extra, so the pin lives in pyproject.toml alone.
torch_requirement() {
    python - <<'PY'
import re, tomllib
with open("pyproject.toml", "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
print(next(d for d in extras["trainer"] if re.match(r"torch\b", d)))
PY
}

if has_extra trainer; then
    pip install --index-url "${torch_index}" "$(torch_requirement)"
fi

pip install ".[${extras}]" "$@"

if has_extra gpu; then
    ort_version="$(pip show onnxruntime-gpu | sed -n 's/^Version: //p')"
    pip uninstall --yes onnxruntime onnxruntime-gpu
    pip install "onnxruntime-gpu[cuda,cudnn]==${ort_version}"
fi

python - > "${VIRTUAL_ENV}/ld.so.conf" <<'PY'
import glob, sysconfig
site = sysconfig.get_paths()["purelib"]
folders = glob.glob(f"{site}/nvidia/*/lib") + glob.glob(f"{site}/tensorrt_libs")
print("\n".join(sorted(folders)))
PY
