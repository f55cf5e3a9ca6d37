"""The whole-model pipeline, in public stages that streaming, DF-MPC and QAT call too:
:func:`~dfquant.pipeline.plan.plan_quantization` (each layer's rule, checked against the layer by
:meth:`~dfquant.config.LayerRule.check_layer`), BatchNorm statistics for bias correction, the BatchNorm fold
(:mod:`~dfquant.pipeline.fold`), :func:`~dfquant.pipeline.quantize.quantize_weight` per layer, the swap, and
the report (:mod:`~dfquant.pipeline.report`). :func:`~dfquant.pipeline.quantize.quantize_model` runs them in
order; :mod:`~dfquant.pipeline.compensate` runs DF-MPC over them.
"""
