#!/usr/bin/env bash
# One device call of a benchmark script, on a GPU machine where vLLM's pack is unpacked in ~/gpu:
#   bash benchmarks/on_gpu.sh SCRIPT [ARGS...]   -> python3 -m benchmarks.SCRIPT run --out $OUT ARGS...
# e.g. serving_side_by_side, lora_cost, quantized_decode, tensor_parallel, real_model_end_to_end. Installs the
# carried wheels (.whl/: grpcio 1.85, smg-grpc-servicer, ...) into ~/gpu/whl once, puts them first on PYTHONPATH,
# the checkout last.
set -euo pipefail
script=$1; shift
if [ ! -f ~/gpu/env.sh ]; then echo "bare machine: ~/gpu/env.sh is missing, carry and unpack vLLM's pack first" >&2; exit 3; fi
source ~/gpu/env.sh
if [ -d .whl ] && [ ! -f ~/gpu/whl/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --target ~/gpu/whl .whl/*.whl && touch ~/gpu/whl/.installed
fi
if [ ! -d superweights/v1 ]; then echo "superweights/v1 (generated, ignored by git) must be carried" >&2; exit 3; fi
export PYTHONPATH="$HOME/gpu/whl:$PYTHONPATH:$(pwd)"
# NVLink multicast stays off (the machine's rule), whatever environment a child process builds.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
exec python3 -m "benchmarks.$script" run --out "${OUT:-benchmarks/gpu}" "$@"
