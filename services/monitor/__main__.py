"""`python -m services.monitor`: a monitor configured from LOOPLINE_MONITOR_* variables."""

from services.monitor.main import main

main()
