"""The training scripts: launched as training/NAME.py from a checkout, installed as latentdiff.scripts.NAME."""
