"""Architectures: torchvision classifiers, the DeepNets-1M template and its architecture space.

Entry points: :func:`~ghnviz.zoo.factory.create_model`, :func:`~ghnviz.zoo.factory.list_models`,
:func:`~ghnviz.zoo.adapt.adapt_to_small_images` and, for the DeepNets-1M splits,
:func:`~ghnviz.zoo.deepnets1m.space.sample_architectures` with :class:`~ghnviz.zoo.deepnets1m.space.ArchSpec`.
"""
