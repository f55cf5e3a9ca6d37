"""Reports: theory and analysis tables (:mod:`~dfquant.report.analysis`), bit-operation cost
(:mod:`~dfquant.report.cost`) and the self-contained HTML report (:mod:`~dfquant.report.html`).
"""
