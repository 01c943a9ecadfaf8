"""Decoding client media (images, video, audio): shared by the gateway (header checks) and the encoders."""
