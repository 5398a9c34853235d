"""The training and evaluation configs (ml_collections), one module per released model or experiment.

Pass one by path to the tools (`--config=configs/lamed.py:stage2_phi3`); a config built on another imports
it as a module (`from configs import lamed`)."""
