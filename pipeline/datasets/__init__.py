"""One module per dataset: each reads a dataset in its official layout and registers its adapter by name.

Adding a dataset is one new module here whose adapter function carries `@register_adapter("<name>", ...)`
(from avcache.pipeline.adapters). The registry imports every module of this package the first time it is
consulted, so nothing else has to name the new dataset.
"""
