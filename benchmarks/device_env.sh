# Source this on the GPU machine (the `device` tool), from the repository root, with `.whl` carried:
#   source benchmarks/device_env.sh
# It installs the wheels the machine lacks (pydantic; mediapipe 0.10.21 with protobuf 4.25, which runs there
# beside numpy 2; the face-restoration packages) into /tmp/site, then ophav itself (editable, no deps) so that
# its plugins are registered through the `ophav` entry-point group exactly as on a user's machine.
# A job started detached to outlive one call must run from a copy (cp -r . /tmp/src; cd /tmp/src): the next call
# copies the working tree again over the one it started in, and a job reading files from there breaks.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null || return 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
