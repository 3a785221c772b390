# StepNet serving image: the FastAPI service on ONNX Runtime (CUDA provider, CPU fallback), with the
# default model from model_repository/ baked in at /models. No torch: the contract between training
# and serving is the model repository alone (docs/design.md 2). Deploying it: docs/deploy.md.
#
#   docker build -t stepnet .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 stepnet           # the baked-in default model (REST, gRPC)
#   docker run --gpus all -p 8000:8000 -v "$PWD/my_repo:/models:ro" stepnet   # your own repository

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# Builder: the project's wheel, and the serve extra's requirements read from pyproject.toml on their
# own, so that the runtime stage's ~3 GB dependency layer is rebuilt only when they change.
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-deps --wheel-dir /dist . \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > /dist/requirements.txt

FROM ${BASE_IMAGE} AS runtime
# python3 -m venv works on the official image (/usr/local/bin/python3) and on Debian's python3
# alike; everything below runs from /opt/venv.
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv

# CUDA user-space libraries come from NVIDIA's pip wheels, through onnxruntime-gpu's own extras
# (pyproject pins onnxruntime-gpu 1.31, built for CUDA 13.0): [cuda] pulls the CUDA 13 toolkit's
# nvidia-cuda-runtime, nvidia-cuda-nvrtc, nvidia-cufft and nvidia-curand, and [cudnn] pulls
# nvidia-cudnn-cu13 (cuDNN 9), which brings nvidia-cublas. That is the set the wheel's metadata
# names: its CUDA provider links cudart, cuBLAS/cuBLASLt and cuRAND, and dlopens cuDNN. The wheels
# weigh ~2.2 GB, about what a CUDA runtime + cuDNN base image adds, and keep the official slim
# Python base (so one Python, the one the project tests).
# The host needs only the NVIDIA driver (R580 or newer for CUDA 13) and the NVIDIA Container
# Toolkit, which mounts libcuda.so.1 and NVML into the container.
COPY --from=builder /dist/requirements.txt /tmp/requirements.txt
RUN ort=$(grep '^onnxruntime-gpu' /tmp/requirements.txt) \
 && pip install -r /tmp/requirements.txt "onnxruntime-gpu[cuda,cudnn]${ort#onnxruntime-gpu}" \
 && rm /tmp/requirements.txt

# The wheel's dependencies are all satisfied by the layer above, so this installs the project only.
COPY --from=builder /dist /tmp/dist
RUN pip install "$(ls /tmp/dist/stepnet-*.whl)[serve]" && rm -rf /tmp/dist

# ONNX Runtime's CUDA provider finds the NVIDIA wheels' libraries (site-packages/nvidia/) through the
# loader path. NVIDIA_DRIVER_CAPABILITIES tells the Container Toolkit which driver libraries to mount
# (CUDA and NVML), as NVIDIA's CUDA images do.
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid 10001 stepnet \
 && useradd --uid 10001 --gid stepnet --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin stepnet

# The default model; mount your own repository over /models (read-only is fine).
COPY model_repository /models

# ONNX Runtime 1.31 on Linux collects usage telemetry and tries to upload it over HTTPS; an
# inference container should make no outbound calls of its own, so the image opts out.
ENV ORT_DISABLE_TELEMETRY=1 \
    STEPNET_MODEL_REPOSITORY=/models \
    STEPNET_DEVICE=auto \
    STEPNET_HOST=0.0.0.0 \
    STEPNET_PORT=8000 \
    STEPNET_GRPC_PORT=8001
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('STEPNET_PORT', '8000'), timeout=4).status != 200)"]
ENTRYPOINT ["stepnet"]
CMD ["serve"]
