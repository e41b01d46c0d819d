"""The retrieval reference baseline: every prompt gets a training image whose caption asks for the same attributes."""
