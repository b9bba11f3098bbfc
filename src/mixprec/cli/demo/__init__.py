"""The digits demo: a small CNN on scikit-learn's bundled handwritten digits."""
