"""gantk: train a small MNIST GAN, export it, and generate digits fast and verified."""
__version__ = "0.1.0"
