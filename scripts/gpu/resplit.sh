#!/usr/bin/env bash
# Re-cut pack.sh's chunks (vLLM's site-packages, no payload) together with a payload file (a model GGUF) into N
# chunks that each fill a device call (64 MiB with the working tree): fewer calls than pack.sh's 59 MB chunks.
#   usage: resplit.sh PACK_DIR PAYLOAD N      -> PACK_DIR/p0..p(N-1) and PACK_DIR/unpack2.sh (c0.. removed)
# On the device, in the folder holding every chunk: bash unpack2.sh -> site/, env.sh and payload.gguf.
set -euo pipefail
dir=$(realpath "$1"); payload=$2; n=$3
cat $(ls "$dir"/c[0-9] | sort) > "$dir/site.tar.xz"
site_bytes=$(stat -c %s "$dir/site.tar.xz")
cat "$dir/site.tar.xz" "$payload" > "$dir/all.bin" && rm -f "$dir/site.tar.xz" "$dir"/c[0-9]
split -n "$n" -d -a 1 "$dir/all.bin" "$dir/p" && rm -f "$dir/all.bin"
cat > "$dir/unpack2.sh" <<EOS
#!/usr/bin/env bash
set -euo pipefail
cat \$(ls p[0-9] | sort) > all.bin
head -c $site_bytes all.bin > site.tar.xz
tail -c +$((site_bytes + 1)) all.bin > payload.gguf
rm -f p[0-9] all.bin; rm -rf site; mkdir site; tar -xJf site.tar.xz -C site; rm -f site.tar.xz
sha256sum payload.gguf
echo "export PYTHONPATH=\$(pwd)/site VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1" > env.sh
echo "unpacked: source \$(pwd)/env.sh"
EOS
chmod +x "$dir/unpack2.sh"
ls -la "$dir"
