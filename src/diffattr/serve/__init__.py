"""``diffattr serve``: a local web app answering "which training images made this image?".

:func:`~diffattr.serve.app.make_app` builds a Starlette application over a run's
:class:`~diffattr.families.index.AttributionIndex` (built when missing): a page to drop an
image or pick one of the run's generated samples, and a JSON API beside it (``docs/serve.md``).
"""
