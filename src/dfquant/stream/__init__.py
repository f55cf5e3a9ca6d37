"""Quantizing checkpoints larger than memory: sharded ``.safetensors`` folders, streamed tensor by tensor.

:func:`quantize_sharded` reads one tensor at a time (memory-mapped), matches tensors to rules by name
(:mod:`dfquant.stream.plan`; the model is never built), quantizes each shard in a worker
(:mod:`dfquant.stream.worker`: in process, on a process pool, or as Ray tasks) and publishes an output folder of
shards plus an index whose manifest is the single-file format's (:mod:`dfquant.stream.run`), which
:func:`dfquant.io.load.load_quantized` reads like a file.
"""

from dfquant.stream.run import OUTPUT_INDEX, StreamResult, is_streamable, quantize_sharded
from dfquant.stream.shards import read_checkpoint

__all__ = ["OUTPUT_INDEX", "StreamResult", "is_streamable", "quantize_sharded", "read_checkpoint"]
