"""freshrec: online deep learning for recommendation.

This package is the glue: configuration, the command line, and `freshrec run`, which wires
stream -> trainer -> publisher -> serving together. The parts live in their own packages.
"""
