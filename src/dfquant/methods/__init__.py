"""Methods: transforms that compose quantizers over tensors or chains of layers.

Each method is pure tensor math (it never sees an ``nn.Module``); :func:`dfquant.api.quantize_model` finds the
tensors (through :mod:`dfquant.graph`) and applies them.

* :mod:`dfquant.methods.bn`: BatchNorm folding and data-free analytic bias correction (Nagel et al. 2019).
* :mod:`dfquant.methods.rex`: residual quantization error expansion, group-sparse, its BOPs and its error bound
  (Yvinec et al. 2023).
"""
