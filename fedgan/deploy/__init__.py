"""Starting FedGAN's processes: command lines, nginx configs, the local launcher."""
