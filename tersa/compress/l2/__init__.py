"""L2 (ICCV 2023) for LLM decoder blocks: learned joint pruning and quantization at a target size.

- :mod:`~tersa.compress.l2.edgescale`: the EdgeScale transform (encode, decode, initialisation);
- :mod:`~tersa.compress.l2.rate`: the differentiable rate estimate and the empirical entropy;
- :mod:`~tersa.compress.l2.layer`: ``L2Linear`` (stored codes) and ``L2TrainLinear`` (training);
- :mod:`~tersa.compress.l2.train`: one block's two alternating phases;
- :mod:`~tersa.compress.l2.stage`: the registered ``l2`` stage (config in ``config``).
"""
