"""`python -m kubecash.broker.executor`: how the broker starts an executor."""
import sys

from .main import main

sys.exit(main())
