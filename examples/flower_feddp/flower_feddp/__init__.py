"""FedDP-style DP (and partial sharing of the encoders) for federated DHU-Net, as a Flower app."""
