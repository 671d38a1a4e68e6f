"""FedGAN: federated, differentially private GAN training for medical images."""

__version__ = "0.1.0"
