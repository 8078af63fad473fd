"""Events in: the feature schema, the sample codec, synthetic and replayed producers, the joiner.

Everything downstream (trainer, publisher, serving) may import from here; nothing here
imports from downstream.
"""
