"""Augmentation ops and policy spaces; every geometric op moves boxes and masks with the image."""
