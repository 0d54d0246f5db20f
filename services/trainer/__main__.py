"""`python -m services.trainer`: a trainer service configured from LOOPLINE_TRAINER_* variables."""

from services.trainer.main import main

main()
