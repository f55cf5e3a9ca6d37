"""Walking a model: the fx tracer that finds quantizable layers, their BatchNorms and activations
(:mod:`~dfquant.graph.trace`), and the layer pairs DF-MPC compensates (:mod:`~dfquant.graph.pairs`).
"""
