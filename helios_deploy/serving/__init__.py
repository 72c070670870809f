"""helios_deploy.serving: a Triton Inference Server model repository that streams video, one node at a time.

- repository.py   artifacts -> model repository (``helios-deploy triton``), written atomically
- configs.py      config.pbtxt text from the component specs (and the helios model's tensors), validated as
                  Triton's ModelConfig
- model.py        the decoupled Python-backend ``helios`` model: one instance per node
- node.py         the node inside it: one LiveScheduler per GPU, placement, owners, control answers, demand
- requests.py     a request's tensors -> an open's keywords or a control action
- live_metrics.py the node's live-stream metrics on Triton's metrics port (helios_live_demand, ...)
- client.py       gRPC client (``helios-deploy client``, ``stream-control``) on node_connection.py
- node_connection.py one node's shared gRPC stream, replies by request id (the API's cluster and client.py)
- tritonserver.py a local tritonserver on CPU from the nvidia-pytriton wheel (tests, users without a GPU)
- service.py      ``python -m helios_deploy.serving.server serve``: tritonserver as a service, drain on SIGTERM
- server.py       that entry point
- containers.py   which NVIDIA Triton release loads the engines
- bench.py        time to first chunk and per chunk: through Triton against the in-process runtime
"""
