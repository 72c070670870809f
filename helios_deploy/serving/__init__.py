"""helios_deploy.serving: a Triton Inference Server model repository that streams video.

- repository.py  artifacts -> model repository (``helios-deploy triton``), written atomically
- configs.py     config.pbtxt text from the component specs, validated as Triton's ModelConfig
- model.py       the decoupled Python-backend ``helios`` model (runs helios_deploy.runtime)
- client.py      gRPC streaming client (``helios-deploy client``)
- server.py      a local tritonserver on CPU from the nvidia-pytriton wheel (tests, users without a GPU)
- bench.py       time to first chunk and per chunk: through Triton against the in-process runtime
"""
