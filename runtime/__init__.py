"""helios_deploy.runtime: run exported Helios artifacts and stream video chunk by chunk.

    from helios_deploy.runtime import Pipeline
    pipe = Pipeline.from_artifacts("engines/demo/artifacts", backend="onnxruntime", device="cpu")
    for chunk in pipe.stream("a cat", num_frames=66, seed=0):
        ...  # chunk.index, chunk.frames (uint8 [T, H, W, 3])
"""

from .pipeline import Chunk, Pipeline

__all__ = ["Chunk", "Pipeline"]
