# tunejob as an image: `docker run --gpus all -v data:/data tunejob jobs/smoke.toml`.
# README.md "Containers" has the build and run commands; tests/container/run.sh builds this
# file and runs jobs inside the result.
#
# Build arguments:
#   BASE                 Debian bookworm, slim (default) or an image made from it. It needs no
#                        CUDA of its own: PyTorch's wheels bring their CUDA libraries.
#   ACCELERATOR          cuda (default) or rocm.
#   ACCELERATOR_VERSION  13.0 (default) takes PyPI's torch, a CUDA 13.0 build, with every
#                        package pinned by hash in requirements.lock. Any other value (12.8 for
#                        drivers older than 580; 7.1 with ACCELERATOR=rocm) takes torch and
#                        torchvision, at the lock's versions, from TORCH_INDEX_URL and the rest
#                        from the lock.
#   TORCH_INDEX_URL      default https://download.pytorch.org/whl/cu128, .../rocm7.1, ...
#   VERSION, REVISION, SOURCE, CREATED   OCI labels (tests/test_deploy.py keeps VERSION equal
#                        to job.__version__).
# A CA bundle for a TLS-inspecting proxy is a BuildKit secret, read by pip in the build stage
# only, so it is in no layer of the image:  --secret id=ca_bundle,src=/path/to/ca.pem
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG ACCELERATOR=cuda
ARG ACCELERATOR_VERSION=13.0
ARG TORCH_INDEX_URL=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's python3 is the runtime stage's too, so the venv's interpreter link stays valid.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY requirements.lock /tmp/requirements.lock
# The pip cache is a BuildKit cache mount: a rebuild downloads nothing again, and the cache
# never lands in a layer.
# hadolint ignore=DL3042
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -s /run/secrets/ca_bundle ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca_bundle > /tmp/ca.pem; \
        export PIP_CERT=/tmp/ca.pem; \
    fi; \
    if [ "$ACCELERATOR" = cuda ] && [ "$ACCELERATOR_VERSION" = 13.0 ]; then \
        pip install --require-hashes --no-deps -r /tmp/requirements.lock; \
    else \
        case "$ACCELERATOR" in \
            cuda) tag="cu$(echo "$ACCELERATOR_VERSION" | tr -d .)" ;; \
            rocm) tag="rocm${ACCELERATOR_VERSION}" ;; \
            *) echo "ACCELERATOR must be cuda or rocm, not $ACCELERATOR" >&2; exit 1 ;; \
        esac; \
        pip install --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$tag}" \
            "$(grep -o '^torch==[^ ]*' /tmp/requirements.lock)" \
            "$(grep -o '^torchvision==[^ ]*' /tmp/requirements.lock)"; \
        awk '/^[A-Za-z0-9]/ { skip = ($0 ~ /^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==/) } \
             !(skip && /^([ A-Za-z0-9])/)' /tmp/requirements.lock > /tmp/rest.lock; \
        pip install --require-hashes --no-deps -r /tmp/rest.lock; \
    fi; \
    rm -f /tmp/ca.pem; \
    pip check
COPY pyproject.toml README.md /src/
COPY job /src/job
# The image's accelerator is what torch says it is, or the build fails: the labels and
# TUNEJOB_ACCELERATOR_VERSION (read by the entrypoint's driver check) cannot lie.
RUN pip install --no-cache-dir --no-deps --no-build-isolation --no-index /src \
 && python -c "import sys, torch; \
have = torch.version.cuda if sys.argv[1] == 'cuda' else (torch.version.hip or ''); \
ok = have == sys.argv[2] if sys.argv[1] == 'cuda' else have.startswith(sys.argv[2]); \
sys.exit(0 if ok else f'torch {torch.__version__} is built for {sys.argv[1]} {have}, not {sys.argv[2]}')" \
    "$ACCELERATOR" "$ACCELERATOR_VERSION" \
 && rm -rf /src


FROM ${BASE} AS runtime
ARG ACCELERATOR=cuda
ARG ACCELERATOR_VERSION=13.0
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=
ARG CREATED=
LABEL org.opencontainers.image.title="tunejob" \
      org.opencontainers.image.description="Fine-tuning job for diffusion models, configured by one TOML file" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.tunejob.accelerator="${ACCELERATOR}" \
      io.tunejob.accelerator.version="${ACCELERATOR_VERSION}"
# python3, CA certificates, tini to forward signals and reap children, and the C compiler and
# Python headers Triton builds its launcher with on first use ([speedups] compile_blocks:
# torch.compile with inductor), about 200 MB.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libstdc++6 ca-certificates tini \
        gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group tunejob \
 && mkdir -p /data /app \
 && chown tunejob:tunejob /data
COPY --from=build /opt/venv /opt/venv
COPY jobs /app/jobs
COPY entrypoint.sh /app/entrypoint.sh
COPY deploy/stop_instance.py /app/stop_instance.py
# Not CUDA_VERSION: the NVIDIA container runtime reads that name and would refuse drivers
# that CUDA's minor-version compatibility allows; the entrypoint checks the driver itself.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/models \
    TUNEJOB_DATA=/data \
    TRITON_CACHE_DIR=/data/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/data/cache/torchinductor \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TUNEJOB_ACCELERATOR=${ACCELERATOR} \
    TUNEJOB_ACCELERATOR_VERSION=${ACCELERATOR_VERSION}
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
VOLUME /data
ENTRYPOINT ["/app/entrypoint.sh"]
