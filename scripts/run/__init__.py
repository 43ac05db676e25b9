"""Run infrastructure: the one-command pipeline, sharded / distributed execution, TorchScript export and the Model
Zoo release package.
"""
