# The Triton node image: NVIDIA's Triton release that loads the engines, with helios-deploy, numpy<2 and the CUDA
# build of torch in the Python backend's environment, run as a non-root user by our service wrapper (drain on
# SIGTERM: docs/serving.md). Build from the helios-deploy checkout:
#
#   docker build -f deploy/triton.Dockerfile \
#     --build-arg TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.02-trtllm-python-py3 \
#     --build-arg TENSORRT_PIN="tensorrt==10.13.3.9" -t registry.example.com/helios-deploy-triton:0.1.0 .
#
# TRITON_IMAGE / TENSORRT_PIN: what the model repository's README.md names (`helios-deploy triton ... --backend
# tensorrt` picks the release that ships the engines' TensorRT: serving/containers.py); the onnxruntime backend
# needs no TensorRT pin (TENSORRT_PIN="").
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.02-trtllm-python-py3
FROM ${TRITON_IMAGE}

ARG TENSORRT_PIN=""
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# the Python backend runs the image's system python3: install into it (Ubuntu 24.04 bases mark it externally managed)
ENV PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

COPY pyproject.toml README.md /opt/helios-deploy/
COPY helios_deploy /opt/helios-deploy/helios_deploy
COPY export /opt/helios-deploy/export
COPY runtime /opt/helios-deploy/runtime

# torch from the CUDA wheel index first, then helios-deploy with numpy<2 (the Python backend stub needs it);
# TENSORRT_PIN is itself the pin (tensorrt==X.Y.Z.W), which hadolint cannot see through the variable
# hadolint ignore=DL3013
RUN python3 -m pip install --extra-index-url "${TORCH_INDEX}" "torch>=2.4" \
    && python3 -m pip install "numpy<2" ${TENSORRT_PIN} /opt/helios-deploy \
    && python3 -c "import helios_deploy.serving.model, torch; print('torch', torch.__version__)"

# the image's own non-root user (uid 1000); the model repository is mounted read-only at /models
USER 1000:1000
WORKDIR /home/triton-server
EXPOSE 8000 8001 8002
ENTRYPOINT ["python3", "-m", "helios_deploy.serving.server", "serve", "/models", \
            "--tritonserver", "/opt/tritonserver/bin/tritonserver", "--address", "0.0.0.0"]
