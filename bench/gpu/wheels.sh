# Sourced by the GPU call scripts: installs the project's dependencies the GPU machine lacks (fla-core, the
# serving stack: fastapi needs opentelemetry-api, huggingface_hub httpx2) from the carried .whl/ folder
# (README.md here: the whole closure, --no-deps), then puts them and this checkout on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
