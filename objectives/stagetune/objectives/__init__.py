"""Objectives shared by server and trainer: the metric catalog (`catalog`), measurement
helpers (`measure`) and the multi-objective math (`pareto`).

Imports nothing else of the project. Nothing is imported here, so that the client and CLI,
which need only `catalog`, do not pay for numpy and moocore (`pareto`).
"""
