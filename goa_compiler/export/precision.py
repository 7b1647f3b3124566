"""``--dtype fp16``: model.onnx with float16 weights, activations and KV cache.

The fp32 export is converted with onnxruntime's float16 converter, after one fusion that
accuracy needs: the RMS norms that the exporter decomposes (Pow, ReduceMean, Add, Sqrt,
Reciprocal, Mul) become SimplifiedLayerNormalization, which normalises in float32 whatever
its input type (its stash type). Decomposed, the mean of squares overflows float16 on
real models (SmolLM2-135M carries activations of 23,000 in its residual stream; their
squares are far beyond float16's 65,504), and the converter rounds every intermediate
result to float16 even between nodes it was told to keep in float32. LayerNormalization
(what the exporter emits for LayerNorm) already normalises in float32. Softmax and the
other ops run in float16 where the provider has the kernel; onnxruntime's CPU provider
casts the nodes it has no float16 kernel for to float32 and back.
"""
from __future__ import annotations

from pathlib import Path

import onnx


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxruntime.transformers import float16
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

    model = ir.load(str(src))
    fuse_rms_normalization(model)
    common.RemoveUnusedNodesPass()(model)
    proto = ir.to_proto(model)
    half = float16.convert_float_to_float16(proto, keep_io_types=False,
                                            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST))
    dst = Path(dst)
    big = half.ByteSize() > 1_800_000_000
    onnx.save_model(half, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=dst.name + ".data" if big else None)
    return dst
