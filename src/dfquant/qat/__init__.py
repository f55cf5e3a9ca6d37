"""Quantization-aware training on the same quantizers: fake quantization, prepare and convert
(:mod:`~dfquant.qat.fake`), training loops (:mod:`~dfquant.qat.train`) and the causal-LM data (:mod:`~dfquant.qat.lm`).
"""
