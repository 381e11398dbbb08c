"""neurohybrid: hybrid mechanistic + deep-learning models of neurological disorders."""

__version__ = "0.1.0"
