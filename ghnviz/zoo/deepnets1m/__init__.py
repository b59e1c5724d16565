"""DeepNets-1M: the network template (:mod:`.net`, :mod:`.ops`), genotypes (:mod:`.genotypes`),
parameter counting (:mod:`.structure`), the architecture generator (:mod:`.sampler`) and the
reproducible splits (:mod:`.space`)."""
