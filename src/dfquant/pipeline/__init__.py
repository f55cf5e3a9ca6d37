"""The whole-model pipeline: :func:`~dfquant.pipeline.quantize.quantize_model` (plan, fold BatchNorm, quantize
each layer, swap, report) and DF-MPC compensation over it (:mod:`~dfquant.pipeline.compensate`).
"""
