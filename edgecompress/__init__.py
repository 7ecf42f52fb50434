"""edgecompress: recipe-driven compression of trained models for edge hardware.

The spine (CLI, recipe schema, pipeline, artifact manifest, model zoo, data sources)
lives in this package; the algorithms live in ``edgecompress.compress``, the exporters
in ``edgecompress.export`` and the runtimes in ``edgecompress.runtimes``.
"""

__version__ = "0.1.0"
