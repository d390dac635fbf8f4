"""``layers="auto"``: the rule lives in :mod:`rfd.defenses.autolayer` (the defenses apply it).

Re-exported here so ``rfd.analysis.auto_layer`` and ``rfd.analysis.autolayer.layer_scores`` keep
working.
"""

from rfd.defenses.autolayer import NU_SOURCES, LayerScores, auto_layer, layer_scores

__all__ = ["NU_SOURCES", "LayerScores", "auto_layer", "layer_scores"]
