"""themis-ray: train, evaluate and serve LLM judges at scale on Ray."""

import os

# torch's OpenMP threads spin at every barrier by default. On a node whose cores are shared (Ray
# packs actors, replicas and data tasks onto them) spinning threads take the cores the others need:
# a 2-thread judge beside one busy process ran 10x slower per token, and passive waiting removed
# that. Set before torch loads, in every process that imports the package; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
