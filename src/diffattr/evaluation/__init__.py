"""Evaluation of attributions: the linear datamodeling score (LDS) and counterfactuals."""
