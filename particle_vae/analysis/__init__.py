"""Metrics, clustering and plots of latent spaces and poses."""
