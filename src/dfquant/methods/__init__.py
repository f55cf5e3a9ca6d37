"""Methods: transforms that compose quantizers over tensors or chains of layers.

Each method is pure tensor math (it never sees an ``nn.Module``); :func:`dfquant.quantize_model` finds the
tensors (through :mod:`dfquant.graph.trace`) and applies them.

* :mod:`dfquant.methods.bn`: BatchNorm folding and data-free analytic bias correction (Nagel et al. 2019).
* :mod:`dfquant.methods.rex`: residual quantization error expansion, group-sparse, its BOPs and its error bound
  (Yvinec et al. 2023).
* :mod:`dfquant.methods.dfmpc`: data-free mixed-precision compensation of a low-bit layer by the next high-bit
  layer, with data-free re-derived BatchNorm statistics (Chen et al. 2023); run on a model by
  :func:`dfquant.pipeline.compensate.compensate_model`.
"""
