"""The command layer: each module registers its subcommands with the CLI's parser.

``runs`` (demo, train, generate, finetune), ``attribute`` (featurize, score, index, query,
report), ``evaluate`` (lds build / eval, counterfactual), ``data`` (data install), ``serve``
(the web app); ``options`` holds the options they share.
Handlers parse options, then call library functions; none branches on a method or family.
"""

from __future__ import annotations


def register_all(add) -> None:
    """Register every subcommand with ``add(name, help, examples, handler)``."""
    from diffattr.commands import attribute, data, evaluate, runs, serve

    for module in (runs, attribute, evaluate, data, serve):
        module.register(add)
