"""Files: the quantized-model format, its schema (:mod:`~dfquant.io.manifest`), atomic writes,
save and load (:mod:`~dfquant.io.save`, :mod:`~dfquant.io.load`) and float checkpoints read
without pickle (:mod:`~dfquant.io.checkpoints`).
"""
