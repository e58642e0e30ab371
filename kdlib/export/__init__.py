"""Deployable models: the packed file format and ONNX export.

* :func:`save_packed` / :func:`load_packed` -- quantized weights as bit-packed integer codes
  (:mod:`kdlib.export.packed`, arithmetic in :mod:`kdlib.export.codes`); the loaded model's eval
  logits equal the original's exactly.
* :func:`to_onnx` -- an ONNX graph of the quantized model (:mod:`kdlib.export.onnx_graph`);
  needs the ``export`` extra (onnx; onnxruntime to run the graph). How ONNX Runtime's logits
  agree with kdlib's: :mod:`kdlib.export.agreement` (``python -m kdlib onnx``).
"""
from kdlib.export.onnx_graph import to_onnx
from kdlib.export.packed import FORMAT, FORMAT_VERSION, load_packed, read_packed_header, save_packed

__all__ = ["save_packed", "load_packed", "read_packed_header", "to_onnx", "FORMAT",
           "FORMAT_VERSION"]

