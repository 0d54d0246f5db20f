"""`python -m services.inference`: a worker configured from LOOPLINE_INFERENCE_* variables."""

from services.inference.main import main

main()
