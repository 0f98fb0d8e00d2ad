#!/usr/bin/env bash
# Copied from shared/gpu/pack.sh, plus what the superweights server and benchmarks need on the device
# (aiohttp and psutil for the benchmark clients, accelerate for GGUF loading, rich for the CLI, loguru for
# compressed-tensors 0.17).
# Build the pieces that carry vLLM (GPU build) onto the lent H200 machine, which has torch 2.11 (CUDA 13)
# but no vLLM and no network. vllm==0.26.0 is the newest release pinned to torch 2.11 with a CUDA 13 build.
#
# usage: pack.sh OUT_DIR [PAYLOAD_FILE]
#   OUT_DIR      a folder your repo ignores (e.g. .gpu, listed in .git/info/exclude)
#   PAYLOAD_FILE optional file to ship too (e.g. a model GGUF); it lands as payload.bin
# Writes OUT_DIR/c0..c3 (each under 60 MB, one per device call) and OUT_DIR/unpack.sh.
set -euo pipefail
out=$(realpath -m "$1"); payload=${2:-}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for t in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 linux; do plat+=(--platform ${t}_x86_64); done
plat+=(--platform any)
pip download -q --no-deps "${plat[@]}" -d "$work/w" vllm==0.26.0
# vLLM's own dependencies that the machine's image lacks (the image has torch, transformers, numpy, grpcio, ...).
pip download -q --no-deps "${plat[@]}" -d "$work/w" \
  blake3 cachetools pydantic pydantic-core annotated-types typing-inspection pyzmq msgspec cbor2 setproctitle \
  depyf astor dill compressed-tensors==0.17.0 python-json-logger pybase64 ijson partial-json-parser lark==1.2.2 \
  jsonschema jsonschema-specifications referencing rpds-py "openai>=2.0.0" jiter distro sniffio "mistral_common>=1.11.5" \
  pycountry pydantic-extra-types "fastapi<0.137" "starlette>=1.0.1" watchfiles lm-format-enforcer==0.11.3 interegular \
  gguf diskcache openai-harmony python-multipart email-validator dnspython annotated-doc opentelemetry-api \
  opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-semantic-conventions-ai importlib-metadata zipp \
  xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 "llguidance<1.8,>=1.7" outlines_core==0.2.14 httpx2 httpcore2 \
  mcp mcp-types anthropic docstring-parser model-hosting-container-standards prometheus-fastapi-instrumentator \
  sse-starlette uvicorn pyjwt python-dotenv pydantic-settings httpx-sse jmespath nvtx==0.2.15 fastsafetensors \
  grpcio-health-checking grpcio-reflection \
  accelerate aiohttp aiohappyeyeballs aiosignal frozenlist multidict yarl propcache psutil rich markdown-it-py mdurl \
  loguru
mkdir -p "$work/site"
for w in "$work"/w/*.whl; do unzip -q -o "$w" -d "$work/site"; done
# Trim what an H200 run does not need: the FlashAttention-2 build (Hopper uses FA3), Blackwell-only sources,
# DeepGEMM sources, the Rust front end, the swagger page. About 710 MB -> 400 MB unpacked.
v="$work/site/vllm"
rm -f "$v/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$v/vllm-rs"
rm -rf "$v/third_party/fmha_sm100" "$v/third_party/deep_gemm" "$v/entrypoints/serve/instrumentator/static"
tar -cf - -C "$work/site" . | xz -6 -T0 > "$work/site.tar.xz"
mkdir -p "$out"; rm -f "$out"/c[0-9]
site_bytes=$(stat -c %s "$work/site.tar.xz")
if [ -n "$payload" ]; then cat "$work/site.tar.xz" "$payload" > "$work/all.bin"; else mv "$work/site.tar.xz" "$work/all.bin"; fi
total=$(stat -c %s "$work/all.bin"); n=$(( (total + 58999999) / 59000000 ))
split -n "$n" -d -a 1 "$work/all.bin" "$out/c"
cat > "$out/unpack.sh" <<EOS
#!/usr/bin/env bash
# Run on the device machine from the folder that holds c0..c$((n-1)) (moved there one call at a time).
set -euo pipefail
cat \$(ls c[0-9] | sort) > all.bin
head -c $site_bytes all.bin > site.tar.xz
if [ $total -gt $site_bytes ]; then tail -c +$((site_bytes + 1)) all.bin > payload.bin; fi
rm -f c[0-9] all.bin; rm -rf site; mkdir site; tar -xJf site.tar.xz -C site; rm -f site.tar.xz
echo "export PYTHONPATH=\$(pwd)/site VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1" > env.sh
echo "unpacked: source \$(pwd)/env.sh"
EOS
chmod +x "$out/unpack.sh"
ls -la "$out"
