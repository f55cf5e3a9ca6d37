"""Grids: number formats (integer, minifloat, block-scaled, non-uniform codebooks), weight distributions
(fits, partial moments, KS), the Lloyd-Max tables and the error model that predicts a rule's MSE.

Modules: :mod:`~dfquant.grids.formats`, :mod:`~dfquant.grids.distributions`, :mod:`~dfquant.grids.lloyd_max`,
:mod:`~dfquant.grids.error_model`.
"""
