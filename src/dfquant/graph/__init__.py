"""Walking a model: its quantizable modules, lookup and swap by name (:mod:`~dfquant.graph.modules`), the one fx
tracer with its BatchNorm and ReLU predicates and the moment program (:mod:`~dfquant.graph.trace`), and the layer
pairs DF-MPC compensates (:mod:`~dfquant.graph.pairs`).
"""
