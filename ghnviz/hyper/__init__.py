"""Graph hypernetworks: model classes, decoding, prediction and checkpoint I/O.

- :mod:`.ghn`: the shared :class:`~.ghn.GHN` base class (prediction path) and the architecture registry;
- :mod:`.ghn2`: GHN-2/GHN-1 (:mod:`.gatedgnn` message passing); :mod:`.ghn3`: GHN-3;
- :mod:`.layers`, :mod:`.decoder`: shared building blocks; :mod:`.config`: :class:`~.config.GHNConfig`;
- :mod:`.predict`: matching graph nodes to tensors, fitting decoded blocks, :class:`~.predict.Prediction`;
- :mod:`.io`: :func:`~.io.load_ghn` / :func:`~.io.save_ghn` and the checkpoint-format registry;
  :mod:`.safe_pickle`: reading pickled checkpoints without running code.
"""
