"""sftflow: an orchestrated, audited pipeline from raw instruction data to a registered model.

Run ``sftflow --help`` for the command line; ``pipelines.yaml`` declares the pipelines.
"""

__version__ = "0.1.0"
