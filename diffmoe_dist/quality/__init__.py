"""Sample-quality metrics: Frechet distance and the embedded digits judge."""
